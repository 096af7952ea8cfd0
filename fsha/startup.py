"""Checks a node runs before it starts, so that what would fail later (at a claim, in a
traceback) ends the start with one line naming the cause (exit status 2).

- the ``ip`` floating-IP backend: ``ip`` and ``arping`` are installed (the guard and the
  fallback path run them) and this process has CAP_NET_ADMIN (address changes over
  netlink) and CAP_NET_RAW (the gratuitous ARP's packet socket);
- an explicit ``[state] dir`` is a writable directory;
- every address the node listens on is free: the heartbeat port on each network, the
  replication stream port, the status address.
"""

from __future__ import annotations

import errno
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from fsha.config import ClusterConfig, NodeConfig

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


class StartupError(Exception):
    """The one line an operator reads; the node does not start."""


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int | None:
    """This process's effective capability bits (None where /proc does not say)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_backend(config: ClusterConfig, which: Callable[[str], str | None] = shutil.which,
                  capabilities: Callable[[], int | None] = effective_capabilities) -> None:
    fip = config.floating_ip
    if fip.backend != "ip":
        return
    missing = [f"{tool} ({package})" for tool, package in
               (("ip", "iproute2"), ("arping", "iputils-arping")) if which(tool) is None]
    if missing:
        raise StartupError(f"{config.path}: floating_ip.backend = \"ip\" needs "
                           f"{' and '.join(missing)}: not found on PATH; install it")
    caps = capabilities()
    if caps is None:
        return  # not Linux /proc: the first claim will tell
    lacking = [name for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"),
                                      (CAP_NET_RAW, "CAP_NET_RAW")) if not caps >> bit & 1]
    if lacking:
        raise StartupError(
            f"{config.path}: floating_ip.backend = \"ip\" needs {' and '.join(lacking)} "
            "(address changes, gratuitous ARP): run fsha as root or with AmbientCapabilities="
            "CAP_NET_ADMIN CAP_NET_RAW (contrib/fsha.service)")


def listen_points(config: ClusterConfig, me: NodeConfig) -> list[tuple[str, int, int, str]]:
    """(host, port, socket type, what) for every socket the node will listen on."""
    from fsha.replication.service import listen_addresses

    points: list[tuple[str, int, int, str]] = []
    for net in config.networks:
        points.append((me.addresses[net.name], net.port, socket.SOCK_DGRAM,
                       f"network {net.name} heartbeat port"))
    if config.tls is not None:
        for host in listen_addresses(me):
            points.append((host, me.stream.port, socket.SOCK_STREAM,
                           "replication stream port"))
    points.append((me.status.host, me.status.port, socket.SOCK_STREAM,
                   "status address"))
    return points


def check_ports(config: ClusterConfig, me: NodeConfig) -> None:
    """Bind each address the node will listen on, as Twisted will, and let go at once."""
    for host, port, kind, what in listen_points(config, me):
        family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
        with socket.socket(family, kind) as s:
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP does
            try:
                s.bind((str(host), int(port)))
            except OSError as e:
                shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
                if e.errno == errno.EADDRINUSE:
                    why = "is in use (another fsha, or another program, listens there)"
                elif e.errno == errno.EADDRNOTAVAIL:
                    why = "is not an address of this host"
                elif e.errno == errno.EACCES:
                    why = "needs privileges (a port below 1024)"
                else:
                    why = f"cannot be bound ({e.strerror})"
                raise StartupError(f"node {me.name}: {what} {shown} {why}") from None


def check_state_dir(config: ClusterConfig, me: NodeConfig) -> None:
    """An explicit ``[state] dir`` must be usable (the default may not be: then the node
    runs without history, and says so)."""
    if not config.state.explicit:
        return
    path = config.state.dir_for(me.name, config.path.parent)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fsha-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"{config.path}: state.dir: {path} is not a writable directory "
                           f"({e.strerror or e})") from None


def check(config: ClusterConfig, me: NodeConfig) -> None:
    check_backend(config)
    check_state_dir(config, me)
    check_ports(config, me)
