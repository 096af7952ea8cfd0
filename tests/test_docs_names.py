"""The names the docs promise operators exist in the code, and the other way round: every
metric in docs/monitoring.rst and every datagram drop reason in docs/monitoring.rst and
docs/design.rst (an alert rule or a dashboard written from the docs must match)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from fsha.detector import Verdict
from fsha.wire.heartbeat import REASONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
METRIC_SUFFIXES = ("_total", "_info", "_bucket", "_count", "_sum")


def literal_metric_names(path: Path) -> set[str]:
    """Every ``fsha_...`` string constant of a module (metrics.py names its families so)."""
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"fsha_[a-z0-9_]+", node.value)}


def node_drop_keys() -> set[str]:
    """The node's own drop reasons: the string keys of ``...drops[...]`` in fsha/node.py
    (the codec's and the detector's reasons come from their modules' constants)."""
    keys = set()
    for node in ast.walk(ast.parse((ROOT / "fsha" / "node.py").read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "drops" and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
    return keys


def table_row(rst: str, name: str) -> str:
    """The text of a table row that starts with ``name`` (continuation lines included)."""
    lines = rst.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"``{name}``"))
    row = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        row.append(line)
    return "\n".join(row)


class DropReasonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.node_keys = node_drop_keys()
        self.assertTrue(self.node_keys, "found no drops[...] keys in fsha/node.py")
        dropped = {v.value for v in Verdict if v.dropped}
        self.known = set(REASONS) | dropped | self.node_keys

    def documented(self, text: str) -> set[str]:
        return set(re.findall(r"``([a-z-]+)``", text))

    def test_the_metric_names_every_reason_and_only_those(self) -> None:
        row = table_row((DOCS / "monitoring.rst").read_text(), "fsha_datagrams_dropped_total")
        self.assertEqual(self.documented(row.partition("reason")[2]), self.known)

    def test_the_design_names_every_reason_and_only_those(self) -> None:
        text = (DOCS / "design.rst").read_text()
        start = text.index("A receiver drops, and counts by reason")
        paragraph = text[start:text.index("\n\n", start)]
        self.assertEqual(self.documented(paragraph), self.known)


class MetricNameTests(SynchronousTestCase):
    def test_documented_metrics_are_the_exported_ones(self) -> None:
        code = literal_metric_names(ROOT / "fsha" / "metrics.py")
        self.assertGreater(len(code), 50)
        text = (DOCS / "monitoring.rst").read_text()

        def base(name: str) -> str:
            for suffix in METRIC_SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in code:
                    return name.removesuffix(suffix)
            return name

        documented = {base(n) for n in re.findall(r"``(fsha_[a-z0-9_]+)``", text)}
        self.assertEqual(sorted(documented - code), [], "documented, not exported")
        rows = {base(n) for n in re.findall(r"^``(fsha_[a-z0-9_]+)``", text, re.M)}
        self.assertEqual(sorted(code - rows), [], "exported, not in a table of the docs")


class StatusNameTests(SynchronousTestCase):
    """``/status`` is made from each component's typed stats (``as_status()``): its sections
    are the ones the docs and ``fsha status`` read, and a path the docs name
    (``freeswitch.probe``, ``limits.totals``...) is in a real node's status."""

    SECTIONS = {"control", "freeswitch", "replication", "feeds", "takeover", "fsevents",
                "limits", "redis", "durable", "guard", "history", "notify", "config"}
    FILE_SUFFIXES = {"service", "jsonl", "conf", "toml", "py", "rst", "xml", "db", "key",
                     "secret", "timer", "socket"}

    def setUp(self) -> None:
        import gc

        from fsha.tap import build_service
        from tests.test_tap_services import _options, _Reactor

        self.addCleanup(gc.unfreeze)  # build_service freezes what it built
        reactor = _Reactor()
        top = build_service(_options(Path(self.mktemp()).resolve(), limits=True), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        reactor.advance(0.1)
        site = next(s for s in top if s.name == "status").args[1]  # type: ignore[attr-defined]
        self.status = site.resource.children[b"status"]._status()

    def test_sections_and_node_keys(self) -> None:
        from fsha.nodestats import NodeStats

        self.assertEqual(set(self.status), self.SECTIONS | set(NodeStats.__slots__))
        for section in ("freeswitch", "replication", "feeds", "takeover", "fsevents",
                        "limits", "control"):
            self.assertIsInstance(self.status[section], dict, section)

    def test_documented_status_paths_exist(self) -> None:
        paths = set()
        for doc in DOCS.rglob("*.rst"):
            for path in re.findall(r"``([a-z_]+(?:\.[a-z_]+)+)``", doc.read_text()):
                # (file names such as freeswitch.service or history.jsonl are not paths)
                if path.split(".")[0] in self.SECTIONS \
                        and path.rsplit(".", 1)[1] not in self.FILE_SUFFIXES:
                    paths.add(path)
        self.assertGreaterEqual(len(paths), 3, paths)
        for path in sorted(paths):
            value: object = self.status
            for key in path.split("."):
                self.assertIsInstance(value, dict, path)
                self.assertIn(key, value, f"{path}: documented, not in /status")
                value = value[key]  # type: ignore[index]
