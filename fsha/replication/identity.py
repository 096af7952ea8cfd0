"""The master's FreeSWITCH runtime, replicated as one ``Kind.IDENTITY`` record per fed slot.

Core UUID (``global_getvar core_uuid``; it changes at every FreeSWITCH start), version
(from ``status``), this node's name and the slot's profiles; value format in
``docs/protocol/records.rst``. Refreshed when a slot starts being fed, when the ESL
connection becomes ready, when FreeSWITCH restarts, and at a sweep tick when a fed slot has
none or an outdated one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from twisted.internet import defer
from twisted.python.failure import Failure

from fsha.fsapi import FSApiError, parse_status, parse_var
from fsha.fsdb import RecordValueError
from fsha.replication.feedslots import FedSlots, FeedsESL
from fsha.wire.stream import Kind

__all__ = ["IDENTITY_KEY", "Identity", "IdentityRefresh", "decode_identity",
           "encode_identity"]

IDENTITY_KEY: Final = "identity"


@dataclass(frozen=True, slots=True)
class Identity:
    node: str
    slot: str
    core_uuid: str
    version: str
    profiles: tuple[str, ...]


def encode_identity(identity: Identity) -> bytes:
    obj = {"node": identity.node, "slot": identity.slot, "core_uuid": identity.core_uuid,
           "version": identity.version, "profiles": list(identity.profiles)}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_identity(value: bytes) -> Identity:
    try:
        obj = json.loads(value)
    except ValueError as e:
        raise RecordValueError(f"identity record is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RecordValueError("identity record is not a JSON object")
    texts = [obj.get(k) for k in ("node", "slot", "core_uuid", "version")]
    profiles = obj.get("profiles")
    if not all(isinstance(t, str) for t in texts) or not isinstance(profiles, list) or \
            not all(isinstance(p, str) for p in profiles):
        raise RecordValueError("identity record has missing or mistyped fields")
    return Identity(*texts, tuple(profiles))  # type: ignore[arg-type]


class IdentityRefresh:
    """Asks FreeSWITCH for its runtime and writes every fed slot's identity record."""

    def __init__(self, slots: FedSlots, esl: FeedsESL, node_name: str, api_timeout: float
                 ) -> None:
        self.slots = slots
        self.esl = esl
        self.node_name = node_name
        self.api_timeout = api_timeout
        self._busy = False

    def outdated(self) -> bool:
        """A fed slot has no identity, or one of an earlier FreeSWITCH runtime."""
        core = self.esl.core_uuid
        return any(f.identity is None or (core and f.identity.core_uuid != core)
                   for f in self.slots.fed.values())

    def refresh(self) -> None:
        slots = self.slots
        if self._busy or not slots.fed or not self.esl.is_healthy:
            return
        self._busy = True
        d_uuid = self.esl.api("global_getvar core_uuid", timeout=self.api_timeout)
        d_status = self.esl.api("status", timeout=self.api_timeout)
        d = defer.gatherResults([d_uuid, d_status], consumeErrors=True)

        def got(outputs: list[str]) -> None:
            core = parse_var("global_getvar core_uuid", outputs[0])
            if not core:
                raise FSApiError("global_getvar core_uuid", outputs[0], "core_uuid is not set")
            version = parse_status("status", outputs[1]).version or ""
            for feed in list(slots.fed.values()):
                identity = Identity(self.node_name, feed.slot.name, core, version,
                                    feed.slot.profiles)
                if identity != feed.identity and slots.put(
                        feed, Kind.IDENTITY, IDENTITY_KEY, encode_identity(identity)):
                    feed.identity = identity

        def failed(failure: Failure) -> None:
            error = failure.value
            if isinstance(error, defer.FirstError):
                failure = error.subFailure
            slots.error(f"identity: {failure.getErrorMessage()}")

        def done(_: object) -> None:
            self._busy = False

        d.addCallbacks(got, failed)
        d.addErrback(slots.failed, "refreshing the identity")
        d.addBoth(done)
