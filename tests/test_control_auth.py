"""Signed control requests (fsha.wire.control): target, replay, time window, bounded memory."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.wire.control import (
    SKEW,
    Accepted,
    ControlAuth,
    Refusal,
    body_digest,
    control_key,
    sign,
)

SECRET = b"control-test-secret-0123456789"
NOW = 1_800_000_000.0
PATH = "/control/maintenance"
BODY = b'{"on": true}'


def signed(node: str = "fs2", *, cluster: str = "demo", secret: bytes = SECRET,
           method: str = "POST", path: str = PATH, body: bytes = BODY, now: float = NOW,
           nonce: str | None = None) -> str:
    return sign(secret, cluster, node, method, path, body, now, nonce)


class ControlAuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.auth = ControlAuth(SECRET, "demo", "fs2")

    def check(self, header: str | None, method: str = "POST", path: str = PATH,
              now: float = NOW) -> Accepted | Refusal:
        return self.auth.check(header, method, path, now)

    def test_accepted_once(self) -> None:
        header = signed()
        verdict = self.check(header)
        self.assertIsInstance(verdict, Accepted)
        assert isinstance(verdict, Accepted)
        self.assertEqual(verdict.body, body_digest(BODY))
        again = self.check(header, now=NOW + 1)
        self.assertEqual(again, Refusal(401, "replayed request (nonce already used)"))

    def test_another_node_or_cluster_is_misdirected(self) -> None:
        verdict = self.check(signed("fs1"))
        assert isinstance(verdict, Refusal)
        self.assertEqual(verdict.code, 421)
        self.assertIn("this request is for fs1, it reached fs2", verdict.message)
        verdict = self.check(signed(cluster="other"))
        assert isinstance(verdict, Refusal)
        self.assertEqual(verdict.code, 421)
        self.assertIn("cluster 'other'", verdict.message)
        self.assertEqual(self.auth.remembered, 0, "a refused request's nonce is not kept")

    def test_forgeries_refused(self) -> None:
        good = signed()
        cases = {
            "another secret": signed(secret=b"another-secret-0123456789"),
            "method changed": good,  # checked as HEAD below
            "path changed": good,  # checked on another path below
            "node edited": good.replace("node=fs2", "node=fs3"),
            "time edited": good.replace(f"time={int(NOW)}", f"time={int(NOW) + 1}"),
            "body digest edited": good.replace(f"body={body_digest(BODY)}",
                                               f"body={body_digest(b'{}')}"),
        }
        for what, header in cases.items():
            method = "HEAD" if what == "method changed" else "POST"
            path = "/control/switchover" if what == "path changed" else PATH
            verdict = self.check(header, method, path)
            self.assertIsInstance(verdict, Refusal, what)
            assert isinstance(verdict, Refusal)
            self.assertEqual(verdict.code, 401, what)
        self.assertIsInstance(self.check(good), Accepted, "the genuine one still works")

    def test_old_bearer_and_junk(self) -> None:
        for header, text in ((None, "missing signature"), ("", "missing signature"),
                             ("Bearer " + "a" * 64, "static bearer tokens are no longer "
                                                    "accepted"),
                             ("Basic Zm9vOmJhcg==", "unknown authorization scheme"),
                             ("FSHA-HMAC-SHA256 node=fs2", "malformed signature"),
                             (signed() + ",mac=00", "malformed signature"),
                             (signed().replace("nonce=", "nonce=Z"), "malformed signature")):
            verdict = self.check(header)
            assert isinstance(verdict, Refusal), header
            self.assertEqual(verdict.code, 401)
            self.assertIn(text, verdict.message)

    def test_time_window(self) -> None:
        for offset in (SKEW + 1, -SKEW - 1, 3600):
            verdict = self.check(signed(now=NOW + offset))
            assert isinstance(verdict, Refusal)
            self.assertIn("off this node's clock", verdict.message)
        self.assertIsInstance(self.check(signed(now=NOW + SKEW)), Accepted)
        self.assertIsInstance(self.check(signed(now=NOW - SKEW)), Accepted)

    def test_nonces_are_bounded_and_forgotten_after_the_window(self) -> None:
        auth = ControlAuth(SECRET, "demo", "fs2", max_nonces=3)
        headers = [signed(nonce=f"{i:032x}") for i in range(4)]
        for h in headers[:3]:
            self.assertIsInstance(auth.check(h, "POST", PATH, NOW), Accepted)
        full = auth.check(headers[3], "POST", PATH, NOW)
        self.assertEqual(full.code if isinstance(full, Refusal) else None, 503,
                         "full: refuse rather than forget a nonce inside the window")
        self.assertEqual(auth.remembered, 3)
        # once the window has passed, the old nonces are forgotten (their requests are
        # refused by time anyway) and new requests are accepted
        later = NOW + 2 * SKEW + 1
        self.assertIsInstance(auth.check(signed(now=later), "POST", PATH, later), Accepted)
        self.assertEqual(auth.remembered, 1)
        replay = auth.check(headers[0], "POST", PATH, later)
        assert isinstance(replay, Refusal)
        self.assertIn("off this node's clock", replay.message)

    def test_names_with_separators(self) -> None:
        auth = ControlAuth(SECRET, "a,b=c d", "n,1=x")
        header = sign(SECRET, "a,b=c d", "n,1=x", "POST", PATH, b"", NOW)
        self.assertIsInstance(auth.check(header, "POST", PATH, NOW), Accepted)

    @settings(max_examples=200, deadline=None)
    @given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
           st.sampled_from(["/control/maintenance", "/control/switchover"]),
           st.binary(max_size=100), st.floats(-SKEW, SKEW))
    def test_sign_then_check(self, cluster: str, node: str, path: str, body: bytes,
                             drift: float) -> None:
        """Whatever the names and body: accepted exactly by the node it names, once."""
        header = sign(SECRET, cluster, node, "POST", path, body, NOW + drift)
        auth = ControlAuth(SECRET, cluster, node)
        verdict = auth.check(header, "POST", path, NOW)
        self.assertEqual(verdict, Accepted(verdict.nonce if isinstance(verdict, Accepted)
                                           else "", body_digest(body)))
        self.assertIsInstance(auth.check(header, "POST", path, NOW), Refusal)
        other = ControlAuth(SECRET, cluster, node + "x")
        refused = other.check(header, "POST", path, NOW)
        self.assertEqual(refused.code if isinstance(refused, Refusal) else None, 421)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=300))
    def test_arbitrary_headers_never_raise(self, header: str) -> None:
        verdict = self.auth.check(header, "POST", PATH, NOW)
        self.assertIsInstance(verdict, Refusal)


DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "control.rst"


def doc_vectors() -> dict[str, str]:
    """The code blocks of docs/protocol/control.rst: caption -> text (lines joined)."""
    found: dict[str, str] = {}
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(":caption:"):
            caption = line.split(":caption:", 1)[1].strip()
            body = []
            for text in lines[i + 2:]:
                if not text.startswith("   "):
                    break
                body.append(text.strip())
            found[caption] = "".join(body)
    return found


class GoldenVectorTests(SynchronousTestCase):
    SECRET = b"0123456789abcdef0123456789abcdef"

    def test_documented_vector(self) -> None:
        vectors = doc_vectors()
        self.assertEqual(sorted(vectors), ["authorization", "control key"])
        self.assertEqual(control_key(self.SECRET).hex(), vectors["control key"])
        header = sign(self.SECRET, "demo", "fs2", "POST", "/control/maintenance",
                      b'{"on": true}', 1_800_000_000.0, nonce="00112233445566778899aabbccddeeff")
        self.assertEqual(header, vectors["authorization"])
        verdict = ControlAuth(self.SECRET, "demo", "fs2").check(
            vectors["authorization"], "POST", "/control/maintenance", 1_800_000_010.0)
        self.assertEqual(verdict, Accepted("00112233445566778899aabbccddeeff",
                                           body_digest(b'{"on": true}')))
