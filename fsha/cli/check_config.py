"""``fsha check-config FILE [--node NAME]``: validate a cluster config (exit 0 or 2).

With ``--node`` it also checks what that node needs on its own host before it can start:
its replication key and certificate (``[tls]``).
"""

from __future__ import annotations

import argparse
import sys

from fsha.config import (
    ConfigError,
    check_tls_files,
    choose_node,
    load_config,
    node_warnings,
    plural,
    secret_file_warnings,
    timing_warnings,
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fsha check-config",
                                     description="Validate a cluster config file.")
    parser.add_argument("config", help="the cluster config file (TOML)")
    parser.add_argument("--node", help="also check that this node is defined and that its "
                                       "TLS key and certificate exist")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        config.read_secret()
        if args.node:
            check_tls_files(config, choose_node(config, args.node))
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    for line in secret_file_warnings(config) + node_warnings(config) + \
            timing_warnings(config):
        print(f"warning: {line}", file=sys.stderr)
    if len(config.networks) < 2:
        print(f"warning: {config.path}: network: only one network; two or more are needed "
              "to tell a dead node from a dead network", file=sys.stderr)
    print(f"{config.path}: OK: cluster {config.name!r}, {plural(len(config.nodes), 'node')}, "
          f"{plural(len(config.slots), 'slot')}, {plural(len(config.networks), 'network')}, "
          f"quorum {config.quorum_spec} ({config.quorum} of {len(config.nodes)}), "
          f"digest {config.digest.hex()}")
    return 0
