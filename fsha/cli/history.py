"""``fsha history``: a node's history of takeovers, releases, maintenance, config changes
(``--all``: every node's, merged in time, so one takeover's id joins their stories).

    fsha history --config /etc/fsha/cluster.toml [--node fs1] [-n 50]
    fsha history --config /etc/fsha/cluster.toml --all --takeover slot1/7
    fsha history --dir /var/lib/fsha/fs1      # from the files, while fsha is stopped

Exit status: 0, 1 when a node cannot be read, 2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fsha.history import read_history
from fsha.status import event_text

JSON = dict[str, Any]


def fetch_history(base: str, limit: int, takeover: str | None, timeout: float
                  ) -> list[JSON]:
    query = {"limit": str(limit)}
    if takeover:
        query["takeover"] = takeover
    url = f"{base}/history?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        entries = json.loads(response.read())
    if not isinstance(entries, list):
        raise ValueError("the history is not a JSON list")
    return entries


def render(entries: list[JSON], show_node: bool = True) -> str:
    lines = []
    for e in entries:
        t = e.get("time") or 0
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + \
            f".{int(t * 1000) % 1000:03d}"
        fields = {k: v for k, v in e.items() if k not in ("node", "takeover")}
        tid = f" [{e['takeover']}]" if e.get("takeover") else ""
        who = f"{e.get('node', '?'):<8} " if show_node else ""
        lines.append(f"{stamp} {who}{event_text(fields)}{tid}")
    return "\n".join(lines) if lines else "(no history)"


def main(argv: list[str]) -> int:
    from fsha.cli.control import base_url
    from fsha.config import ConfigError, choose_node, load_config

    parser = argparse.ArgumentParser(prog="fsha history", description=(
        "Show a node's history (takeovers, releases, fences, maintenance, config changes)."))
    parser.add_argument("--config", help="the cluster config file (to find the nodes)")
    parser.add_argument("--node", help="which node (default: the local one)")
    parser.add_argument("--all", action="store_true", help="every node, merged in time")
    parser.add_argument("--url", help="a node's status address, e.g. http://127.0.0.1:7420")
    parser.add_argument("--dir", help="read a state directory's files (fsha may be stopped)")
    parser.add_argument("-n", "--limit", type=int, default=50,
                        help="the newest N entries per node (default 50)")
    parser.add_argument("--takeover", metavar="SLOT/EPOCH", help="only this takeover")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    entries: list[JSON] = []
    failed: list[str] = []
    if args.dir:
        entries = read_history(Path(args.dir), limit=args.limit, takeover=args.takeover)
    else:
        try:
            if args.url:
                bases = [("", args.url.rstrip("/").removesuffix("/status"))]
            elif not args.config:
                parser.error("give --config, --url or --dir")
            else:
                config = load_config(args.config)
                nodes = config.nodes if args.all else [choose_node(config, args.node)]
                bases = [(n.name, base_url(n.status.host, n.status.port)) for n in nodes]
        except ConfigError as e:
            print(e.problems[0], file=sys.stderr)
            return 2
        for name, base in bases:
            try:
                entries += fetch_history(base, args.limit, args.takeover, args.timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                failed.append(f"{name or base}: {getattr(e, 'reason', e)}")
        entries.sort(key=lambda e: e.get("time") or 0)
    if args.json:
        for e in entries:
            print(json.dumps(e, default=str))
    else:
        print(render(entries, show_node=args.all or len({e.get("node") for e in entries}) > 1))
    for line in failed:
        print(f"fsha history: cannot read {line}", file=sys.stderr)
    return 1 if failed else 0
