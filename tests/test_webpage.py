"""The status page at ``/``: made from the same status and words as ``fsha status``, JSON
for anything that does not ask for HTML, and live in a real headless Chromium."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from fsha.harness import LoopbackCluster, wait_for
from fsha.status import status_site_root
from fsha.webpage import render_page

from .fakecluster import FakeCluster, make_config

ROOT = Path(__file__).resolve().parent.parent


def formed() -> FakeCluster:
    cluster = FakeCluster(make_config(nodes=3, slots=2))
    cluster.start_all()
    cluster.advance(cluster.config.discovery + 0.5)
    return cluster


class PageTests(SynchronousTestCase):
    def get(self, root: object, path: bytes, accept: bytes | None) -> tuple[bytes, bytes]:
        request = DummyRequest([path])
        if accept is not None:
            request.requestHeaders.setRawHeaders(b"accept", [accept])
        child = root.getChildWithDefault(path, request)  # type: ignore[attr-defined]
        body = child.render(request)
        return request.responseHeaders.getRawHeaders(b"content-type")[0], body

    def test_browser_gets_html_and_scripts_get_json(self) -> None:
        cluster = formed()
        node = cluster.nodes["fs3"]
        root = status_site_root(node.status)
        kind, body = self.get(root, b"", b"text/html,application/xhtml+xml,*/*;q=0.8")
        self.assertTrue(kind.startswith(b"text/html"))
        self.assertIn(b"<h2>Slots</h2>", body)
        kind, body = self.get(root, b"", b"*/*")
        self.assertEqual(kind, b"application/json")
        self.assertEqual(json.loads(body)["node"], "fs3")
        kind, body = self.get(root, b"", None)
        self.assertEqual(json.loads(body)["node"], "fs3")
        kind, body = self.get(root, b"view", None)
        self.assertTrue(kind.startswith(b"text/html"))
        self.assertNotIn(b"<script", body)

    def test_the_page_says_what_fsha_status_says(self) -> None:
        cluster = formed()
        cluster.kill("fs1")
        cluster.advance(1.0)
        status = cluster.nodes["fs3"].status()
        status["cluster"] = "<b>demo</b>"  # escaped, never markup
        page = render_page(status)
        self.assertIn("&lt;b&gt;demo&lt;/b&gt;", page)
        self.assertIn("fs1 is down (last heard 1.0 s ago)", page)
        self.assertIn("claim slot=slot1 epoch=2 previous=fs1", page)


class BrowserTests(SynchronousTestCase):
    """A real headless Chromium opens a node's page and sees it refresh by itself."""

    def setUp(self) -> None:
        from .browser import missing

        why = missing()
        if why:
            raise self.skipTest(why)

    def test_page_in_a_real_browser_refreshes_live(self) -> None:
        from .browser import Browser

        cluster = LoopbackCluster(2, 1, workdir=Path(self.mktemp()).absolute())
        self.addCleanup(cluster.close)
        cluster.start()
        cluster.wait_converged(60)
        node = cluster.node("fs1")
        page = node.status_url.removesuffix("status")
        # curl and scripts still get JSON at /
        with urllib.request.urlopen(page, timeout=10) as response:
            self.assertEqual(json.loads(response.read())["node"], "fs1")
        browser = Browser()
        self.addCleanup(browser.close)
        browser.go(page)
        text = browser.run("return document.body.innerText")
        self.assertIn("cluster demo", text)
        self.assertIn("Slots", text)
        self.assertIn("Problems", text)
        # live: the page refreshes itself, and shows a change without a reload
        wait_for("two refreshes", lambda: int(browser.run(
            "return document.body.dataset.refreshes")) >= 2, 60)
        cluster.stop("fs2", timeout=60)
        wait_for("the page to show fs2 down", lambda: "fs2 is down" in browser.run(
            "return document.getElementById('view').innerText"), 60)
        cluster.restart("fs2")
        cluster.wait_converged(60)
        wait_for("the page to show fs2 back", lambda: "fs2 is down" not in browser.run(
            "return document.getElementById('view').innerText"), 60)
        shot = os.environ.get("FSHA_SCREENSHOT")  # docs/images/status-page.png is made so
        if shot:
            browser.screenshot(Path(shot))
