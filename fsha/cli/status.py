"""``fsha status``: the cluster as one node sees it (``--all``: as every node sees it).

It fetches ``GET /status`` from a node's status address (``--url``, or ``--config`` +
``--node`` to find it) and prints what :mod:`fsha.status` renders.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from fsha.status import render

JSON = dict[str, Any]


def fetch(url: str, timeout: float = 3.0) -> JSON:
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def status_url(config_path: str, node: str | None) -> str:
    from fsha.config import choose_node, load_config

    config = load_config(config_path)
    me = choose_node(config, node)
    host = f"[{me.status.host}]" if ":" in me.status.host else me.status.host
    return f"http://{host}:{me.status.port}/status"


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C, above all in --watch: a clean end, no traceback
        print()
        return 0


def _main(argv: list[str]) -> int:
    from fsha.config import ConfigError

    parser = argparse.ArgumentParser(prog="fsha status",
                                     description="Show the cluster as one node sees it.")
    parser.add_argument("--config", help="cluster config file (to find the node's status address)")
    parser.add_argument("--node", help="which node to ask (default: the local one)")
    parser.add_argument("--url", help="status URL, e.g. http://127.0.0.1:8080/status")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="refresh every SECONDS until interrupted")
    parser.add_argument("--all", action="store_true",
                        help="ask every node (--config): views side by side, disagreements "
                             "and warnings in words")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.all:
        if not args.config:
            parser.error("--all needs --config (to find every node)")
        return _all(args)
    if not args.url and not args.config:
        parser.error("give --url or --config")
    try:
        url = args.url or status_url(args.config, args.node)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    while True:
        try:
            status = fetch(url, args.timeout)
        except (urllib.error.URLError, OSError, ValueError) as e:
            print(f"fsha status: cannot read {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
            if not args.watch:
                return 1
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(json.dumps(status, indent=1) if args.json else render(status), flush=True)
        if not args.watch:
            return 0
        time.sleep(args.watch)  # the refresh period the operator asked for


def _all(args: argparse.Namespace) -> int:
    from fsha.cli.control import base_url
    from fsha.clusterview import render_all
    from fsha.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(e.problems[0], file=sys.stderr)
        return 2
    order = [n.name for n in config.nodes]
    addresses = {ip: n.name for n in config.nodes for ip in n.addresses.values()}
    while True:
        views: dict[str, JSON | str] = {}
        for node in config.nodes:
            url = base_url(node.status.host, node.status.port) + "/status"
            try:
                status = fetch(url, args.timeout)
                if status.get("node") != node.name:  # a shared (loopback) status address
                    raise ValueError(f"{url} answers as {status.get('node')}")
                views[node.name] = status
            except (urllib.error.URLError, OSError, ValueError) as e:
                views[node.name] = f"{url}: {getattr(e, 'reason', e)}"
        if args.json:
            print(json.dumps(views, indent=1), flush=True)
        else:
            if args.watch:
                print("\033[2J\033[H", end="")
            print(render_all(order, views, addresses), flush=True)
        if not args.watch:
            return 0 if all(isinstance(v, dict) for v in views.values()) else 1
        time.sleep(args.watch)  # the refresh period the operator asked for
