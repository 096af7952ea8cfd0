"""`fsha status`: the table and the problems in words, from real node status dicts."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.cli.status import main
from fsha.status import problems, render, status_site_root

from .fakecluster import FakeCluster, make_config


def formed() -> FakeCluster:
    cluster = FakeCluster(make_config(nodes=3, slots=2))
    cluster.start_all()
    cluster.advance(cluster.config.discovery + 0.5)
    return cluster


class RenderTests(SynchronousTestCase):
    def test_healthy_cluster(self) -> None:
        cluster = formed()
        status = cluster.nodes["fs3"].status()
        self.assertEqual(problems(status), [])
        text = render(status)
        self.assertIn("cluster demo   seen from fs3 (slave)   quorum ok (3 seen, 2 needed)", text)
        self.assertRegex(text, r"fs1\s+master\s+-\s+slot1\s+1\s+up \d+ms rtt \d+\.\d\dms"
                               r"\s+up \d+ms rtt \d+\.\d\dms")
        self.assertRegex(text, r"fs3\*\s+slave\s+1\s+-\s+-\s+self\s+self")
        self.assertIn("problems: none", text)
        json.dumps(status)  # serialisable as served

    def test_degraded_network_down_node_and_takeover_in_words(self) -> None:
        cluster = formed()
        cluster.cut.add(("fs2", "B"))
        cluster.advance(3.0)
        text = render(cluster.nodes["fs3"].status())
        self.assertRegex(text, r"network B: fs2 unreachable for [23]\.\d s")
        cluster.kill("fs1")
        cluster.advance(1.0)
        status = cluster.nodes["fs3"].status()
        found = problems(status)
        self.assertTrue(any(p.startswith("fs1 is down (last heard 1.0 s ago)") for p in found),
                        found)
        text = render(status)
        self.assertRegex(text, r"fs1\s+DOWN")
        self.assertRegex(text, r"slot1\s+fs3\s+2")
        self.assertIn("claim slot=slot1 epoch=2 previous=fs1", text)

    def test_no_quorum_and_orphan_slot(self) -> None:
        cluster = formed()
        cluster.kill("fs1")
        cluster.kill("fs3")
        cluster.advance(1.0)
        found = problems(cluster.nodes["fs2"].status())
        self.assertIn("slot slot1 has no master", found)
        self.assertTrue(any(p.startswith("no quorum: 1 of 2") for p in found), found)

    def test_freeswitch_down_explained(self) -> None:
        cluster = formed()
        cluster.health["fs3"].ok = False
        cluster.advance(0.2)
        status = cluster.nodes["fs3"].status()
        status["freeswitch"] = {"last_error": "connection refused"}
        self.assertIn("fs3 (this node): its FreeSWITCH is not answering (connection refused)",
                      problems(status))
        self.assertIn("fs3: its FreeSWITCH is not answering",
                      problems(cluster.nodes["fs1"].status()))
        self.assertEqual(cluster.nodes["fs1"].status()["ranking"], [])


class ResourceAndCLITests(SynchronousTestCase):
    def test_resource_serves_json(self) -> None:
        root = status_site_root(lambda: {"hello": 1})
        request = DummyRequest([b"status"])
        resource = root.getChildWithDefault(b"status", request)
        body = resource.render(request)
        self.assertEqual(json.loads(body), {"hello": 1})
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])

    def test_unreachable_node(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(["--url", "http://127.0.0.1:9/status", "--timeout", "2"])
        self.assertEqual(code, 1)
        self.assertIn("cannot read http://127.0.0.1:9/status", err.getvalue())

    def test_bad_config(self) -> None:
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["--config", "/nonexistent.toml"])
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent.toml: cannot read", err.getvalue())


class AllNodesTests(SynchronousTestCase):
    """``fsha status --all``: views side by side, disagreements and warnings in words."""

    def test_agreeing_cluster_side_by_side(self) -> None:
        from fsha.clusterview import render_all

        cluster = formed()
        views = {n: cluster.nodes[n].status() for n in ("fs1", "fs2", "fs3")}
        text = render_all(["fs1", "fs2", "fs3"], views)  # type: ignore[arg-type]
        self.assertIn("cluster demo: 3 node(s) asked, 3 answered", text)
        self.assertRegex(text, r"role\s+master slot1/1\s+master slot2/1\s+slave")
        self.assertRegex(text, r"sees fs1\s+self\s+up\s+up")
        self.assertIn("agreement: all nodes that answered agree", text)
        self.assertIn("warnings: none", text)

    def test_disagreements_and_warnings_in_words(self) -> None:
        from fsha.clusterview import render_all

        cluster = formed()
        cluster.kill("fs3")  # the only spare: no standby left
        cluster.cut.add(("fs2", "B"))
        cluster.advance(3.0)
        views: dict[str, object] = {n: cluster.nodes[n].status() for n in ("fs1", "fs2")}
        views["fs1"]["config_digest"] = "aaaa" * 4  # type: ignore[index]
        views["fs2"]["replication"] = {"peers": {"fs3": {  # type: ignore[index]
            "up": False, "last_end": {"clean": False, "reason": "Connection lost",
                                      "time": 0.0}}}}
        cluster.nodes["fs1"].recent_drops.add("tag", "127.0.1.9", cluster.clock.seconds())
        views["fs1"]["recent_drops"] = cluster.nodes["fs1"].recent_drops.recent(  # type: ignore[index]
            cluster.clock.seconds())
        views["fs3"] = "http://127.0.1.3:7420/status: Connection refused"
        text = render_all(["fs1", "fs2", "fs3"], views,  # type: ignore[arg-type]
                          {"127.0.1.9": "intruder"})
        self.assertIn("the config differs: fs1 runs aaaaaaaa; fs2 runs", text)
        self.assertIn("network B: fs1 does not hear fs2", text)
        self.assertIn("fs3 crashed or was cut off at", text)
        self.assertIn("(its links were lost: Connection lost)", text)
        self.assertIn("no standby left for slot1: if fs1 fails, it has no master", text)
        self.assertIn("fs1 dropped 1 datagram(s) (tag) from 127.0.1.9 (intruder) in the "
                      "last 300 s", text)
        self.assertRegex(text, r"role\s+master slot1/1\s+master slot2/1\s+NO ANSWER")
