"""The ``fsha`` command: one entry point, one module per subcommand.

Each subcommand lives in its own module and exposes ``main(argv: list[str]) -> int``
(or the function named after a colon);
it is imported only when used, so ``fsha check-config`` stays fast and does not pull
in the reactor.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "check-config": ("fsha.cli.check_config", "validate a cluster config file (exit 0 or 2)"),
    "status": ("fsha.cli.status", "show the cluster as a node sees it"),
    "config": ("fsha.cli.config", "config push FILE: change every node's config online "
                                  "(--dry-run: the difference and what moves)"),
    "demo": ("fsha.demo", "run a live demo cluster on loopback"),
    "sim": ("fsha.sim.cli", "run the FreeSWITCH simulator"),
    "certs": ("fsha.pki", "cluster PKI: init a CA, issue and show node certificates"),
    "maintenance": ("fsha.cli.control:maintenance_main",
                    "drain a node (on) or bring it back (off)"),
    "switchover": ("fsha.cli.control:switchover_main", "move a slot to the primary candidate"),
    "drill": ("fsha.cli.drill", "a planned failover of a slot, checked end to end"),
    "history": ("fsha.cli.history", "a node's history (--all: every node's, merged)"),
    "reconcile": ("fsha.localdrop:reconcile_main",
                  "while fsha is stopped: no slot address, profile or call left here"),
}


def usage() -> str:
    lines = ["usage: fsha COMMAND [ARGS...]   (fsha --version: the version)", "",
             "commands:"]
    for name, (_module, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<14} {text}")
    lines.append("")
    lines.append("The node daemon itself runs as: twistd -n fsha --config FILE [--node NAME]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--version", "-V", "version"):
        from fsha import __version__

        print(f"fsha {__version__}")
        return 0
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"fsha: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = SUBCOMMANDS[name][0]
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
