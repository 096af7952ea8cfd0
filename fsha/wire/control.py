"""Signed control requests: each one names its target node and cannot be replayed.

A control request (``fsha maintenance``, ``fsha switchover``) carries one header::

    Authorization: FSHA-HMAC-SHA256 cluster=C,node=N,time=T,nonce=R,body=D,mac=M

``cluster`` and ``node`` are the cluster's and the target node's names (percent-encoded),
``time`` the sender's Unix time in whole seconds, ``nonce`` 32 random hex digits, ``body``
the SHA-256 of the request body (hex), and ``mac`` the HMAC-SHA256, under a key derived
from the cluster secret, of the canonical text: the lines ``fsha-control-v2``, method,
path, cluster, node, time, nonce and body digest, joined by LF. The secret itself never
travels; whoever can read the secret file can steer the cluster.

A node accepts a request only if the MAC is right, ``time`` is within ``SKEW`` seconds of
its own clock, the cluster and node are its own, and the nonce was not seen in that
window (then it is remembered until its time leaves the window). So a captured request
cannot be replayed (same nonce), sent later (time), nor sent to another node (node name
under the MAC). The nonces remembered are bounded: a node that would need more refuses
(503) rather than forget one still inside the window. Pure functions and one small class,
no I/O: the HTTP side is :mod:`fsha.nodecontrol`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote, unquote

SCHEME = "FSHA-HMAC-SHA256"
LABEL = b"fsha-control-v2"
SKEW = 30.0  # seconds either side of the receiver's clock
MAX_NONCES = 4096  # remembered at once per node (~60 s of requests at most)
EMPTY_BODY = hashlib.sha256(b"").hexdigest()

_FIELDS = ("cluster", "node", "time", "nonce", "body", "mac")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def control_key(secret: bytes) -> bytes:
    """The key control requests are signed with (never the cluster secret itself)."""
    return hmac.new(secret, b"fsha control key v2", hashlib.sha256).digest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _canonical(method: str, path: str, cluster: str, node: str, time: int, nonce: str,
               body: str) -> bytes:
    return b"\n".join([LABEL, method.encode(), path.encode(), cluster.encode(),
                       node.encode(), str(time).encode(), nonce.encode(), body.encode()])


def sign(secret: bytes, cluster: str, node: str, method: str, path: str, body: bytes,
         now: float, nonce: str | None = None) -> str:
    """The ``Authorization`` header value for one request to ``node``."""
    nonce = os.urandom(16).hex() if nonce is None else nonce
    time, digest = int(now), body_digest(body)
    mac = hmac.new(control_key(secret), _canonical(method, path, cluster, node, time, nonce,
                                                   digest), hashlib.sha256).hexdigest()
    return (f"{SCHEME} cluster={quote(cluster, safe='')},node={quote(node, safe='')},"
            f"time={time},nonce={nonce},body={digest},mac={mac}")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: the HTTP status and the sentence the operator reads."""

    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """An authentic request for this node; its body must hash to ``body``."""

    nonce: str
    body: str


class ControlAuth:
    """Checks the ``Authorization`` of control requests for one node (see the module)."""

    def __init__(self, secret: bytes, cluster: str, node: str, *, skew: float = SKEW,
                 max_nonces: int = MAX_NONCES) -> None:
        self._key = control_key(secret)
        self.cluster = cluster
        self.node = node
        self.skew = skew
        self.max_nonces = max_nonces
        # nonce -> when it may be forgotten, in arrival order (oldest first)
        self._seen: OrderedDict[str, float] = OrderedDict()

    def check(self, header: str | None, method: str, path: str, now: float
              ) -> Accepted | Refusal:
        """Accept (and remember its nonce) or refuse one request, from its headers only."""
        if not header:
            return Refusal(401, "missing signature: use `fsha maintenance` / "
                                "`fsha switchover` (signed with the cluster secret)")
        scheme, _, rest = header.strip().partition(" ")
        if scheme.lower() == "bearer":
            return Refusal(401, "static bearer tokens are no longer accepted: control requests "
                                "are signed per request (upgrade the fsha that sent it)")
        if scheme != SCHEME:
            return Refusal(401, f"unknown authorization scheme {scheme[:40]!r}")
        fields: dict[str, str] = {}
        for part in rest.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or name not in _FIELDS or name in fields:
                return Refusal(401, "malformed signature")
            fields[name] = value
        if len(fields) != len(_FIELDS) or not fields["time"].isascii() \
                or not fields["time"].isdigit() or not _HEX32.fullmatch(fields["nonce"]) \
                or not _HEX64.fullmatch(fields["body"]) or not _HEX64.fullmatch(fields["mac"]):
            return Refusal(401, "malformed signature")
        cluster, node = unquote(fields["cluster"]), unquote(fields["node"])
        time = int(fields["time"])
        expected = hmac.new(self._key, _canonical(method, path, cluster, node, time,
                                                  fields["nonce"], fields["body"]),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, fields["mac"]):
            return Refusal(401, "bad signature (another cluster secret?)")
        if abs(now - time) > self.skew:
            return Refusal(401, f"request time is {now - time:+.0f} s off this node's clock "
                                f"(allowed: {self.skew:g} s): a replay, or clocks not in sync")
        if cluster != self.cluster:
            return Refusal(421, f"this request is for cluster {cluster!r}, it reached "
                                f"{self.node} of cluster {self.cluster!r}")
        if node != self.node:
            return Refusal(421, f"this request is for {node}, it reached {self.node}: "
                                f"{node}'s status address leads to {self.node} from where "
                                "it was sent (a loopback address is only its own host's)")
        seen = self._seen
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        nonce = fields["nonce"]
        if nonce in seen:
            return Refusal(401, "replayed request (nonce already used)")
        if len(seen) >= self.max_nonces:
            return Refusal(503, f"more than {self.max_nonces} control requests in "
                                f"{2 * self.skew:g} s: try again later")
        seen[nonce] = time + self.skew
        return Accepted(nonce, fields["body"])

    @property
    def remembered(self) -> int:
        """Nonces held now (bounded by ``max_nonces``)."""
        return len(self._seen)
