"""A node's side of catching up with the cluster's config (decisions:
:mod:`fsha.configcatchup`).

Every second the node looks at which peers it has a replication link to (a whole link,
or one that carries only control requests between two configs) and asks those due
``POST /control/config/offer`` (``{"epoch", "file"}``: what it holds), signed for the
peer with the cluster secret as any control request (``docs/protocol/control.rst``) and
carried by a CONTROL_REQUEST frame (``docs/protocol/stream.rst``). The peer answers
what it holds (``{"node", "epoch", "digest", "file", "seal"}``), with ``"text"`` when
its epoch is above the asker's and its file is sealed.

A file the plan chooses is checked before anything is written: its epoch line is the
epoch announced, its seal is right under this node's secret, it is the file announced
(file id) and, parsed as this node's config, it passes exactly the checks of a push
(:meth:`fsha.configstage.ConfigStager.validate`: this node in it, the same secret, its
TLS files) and has the digest announced. A file that fails is refused: logged, counted,
in the status and the history (``config-refused``), never written. The file on disk must
still be the one this node read (or last wrote): if it changed since (edited by hand),
nothing is written either.

Then the file is written atomically (the old file or the new one survives a crash or a
restart mid-way: a restart before the write asks again, one after it runs the new file),
and:

* every difference from the running config online (:func:`fsha.configplan.diff`): it is
  applied as an activation applies it, a ``config`` history event with ``source``;
* otherwise the node keeps running its config: a warning in the log, in ``fsha status``
  (naming the keys) and a ``config-pending`` history event. It does **not** restart by
  itself: the file on disk is the newest, so the next restart (the operator's, at a time
  of their choosing) runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from twisted.application import service
from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fsha.configcatchup import CatchUpPlan, Held, Take
from fsha.configplan import diff, file_epoch, file_id, seal_state
from fsha.configstage import ConfigStager, Refused, write_atomically
from fsha.replication.relay import ControlRelay
from fsha.wire.control import sign

OFFER_PATH: Final = "/control/config/offer"
MAX_TEXT: Final = 512 * 1024  # a config file is a few KB; the frame limit is 1 MiB
TICK: Final = 1.0

log = Logger(namespace="fsha.config")


@dataclass(frozen=True, slots=True)
class CatchUpStats:
    """``fsha_config_catchup_total`` (fsha.metrics)."""

    taken: int  # files written (applied, or waiting for a restart)
    refused: int  # files that failed a check, never written


@dataclass(frozen=True, slots=True)
class Pending:
    """A newer config written to the file that needs a restart to run."""

    held: Held
    text: str
    peer: str
    keys: tuple[str, ...]
    at: float


def held_of(text: str | None, epoch: int, digest: bytes, secret: bytes) -> Held:
    return Held(epoch, digest.hex(), file_id(text or ""),
                seal_state(text or "", secret) if text else "none")


class ConfigCatchUp(service.Service):
    def __init__(self, stager: ConfigStager, secret: bytes, cluster: str,
                 relay: ControlRelay, clock: IReactorTime, plan: CatchUpPlan | None = None
                 ) -> None:
        self.stager = stager
        self.secret = secret
        self.cluster = cluster
        self.relay = relay
        self.clock = clock
        self.plan = plan if plan is not None else CatchUpPlan()
        self.pending: Pending | None = None
        self.taken = 0
        self._loop: task.LoopingCall | None = None
        own = self.held()
        if own.seal == "hand-edited":
            log.warn("config: {path} was edited after its push (its epoch {epoch} line's "
                     "seal does not match the file): it is not offered to the other nodes "
                     "nor replaced by theirs", path=str(stager.running.path),
                     epoch=own.epoch)

    # -- what this node holds and offers -------------------------------------------------

    def _current(self) -> tuple[Held, str | None]:
        stager = self.stager
        pending = self.pending
        if pending is not None and pending.held.epoch <= stager.epoch:
            self.pending = pending = None  # a push activated an epoch since
        if pending is not None:
            return pending.held, pending.text
        return held_of(stager.text, stager.epoch, stager.running.digest, self.secret), \
            stager.text

    def held(self) -> Held:
        return self._current()[0]

    def offer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``/control/config/offer`` (``{"epoch": N}``: the asker's)."""
        asker = body.get("epoch")
        if not isinstance(asker, int) or isinstance(asker, bool) or asker < 0:
            raise ValueError('"epoch" must be the asker\'s epoch (an integer, 0 or more)')
        held, text = self._current()
        answer: dict[str, Any] = {"node": self.stager.me, "epoch": held.epoch,
                                  "digest": held.digest, "file": held.file, "seal": held.seal}
        if held.epoch > asker and held.seal == "sealed" and text is not None:
            answer["text"] = text
        return answer

    # -- the loop --------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(TICK, now=True).addErrback(
            lambda f: log.failure("config catch-up loop failed", f))

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def tick(self) -> None:
        now = self.clock.seconds()
        peers = {n.name for n in self.stager.running.nodes if n.name != self.stager.me}
        self.plan.links({p for p in peers if self.relay.links(p) is not None}, now)
        for peer in self.plan.to_ask(now):
            self.ask(peer)
        take = self.plan.decide(self.held(), now)
        if take is not None:
            self.take(take)

    def ask(self, peer: str) -> None:
        own = self.held()
        body = json.dumps({"epoch": own.epoch, "file": own.file}).encode()
        auth = sign(self.secret, self.cluster, peer, "POST", OFFER_PATH, body,
                    self.clock.seconds())
        self.plan.asking(peer, self.clock.seconds())
        d = self.relay.request(peer, auth, OFFER_PATH, body)

        def answered(result: tuple[int, bytes]) -> None:
            if not self.running:
                return  # stopping: nothing is written any more
            status, raw = result
            try:
                answer = json.loads(raw)
                held = Held(int(answer["epoch"]), str(answer["digest"]), str(answer["file"]),
                            str(answer["seal"]))
                text = answer.get("text")
                if status != 200 or (text is not None and not isinstance(text, str)):
                    raise ValueError(answer.get("error", f"HTTP {status}"))
            except (ValueError, KeyError, TypeError) as e:
                # e.g. a peer of a version without catch-up (404/409): asked again later
                log.debug("config: {peer} did not say which config it holds: {why}",
                          peer=peer, why=str(e))
                self.plan.failed(peer)
                return
            self.plan.answered(peer, held, text, self.clock.seconds())
            take = self.plan.decide(self.held(), self.clock.seconds())
            if take is not None:
                self.take(take)

        def failed(f: Any) -> None:
            log.debug("config: asking {peer} for its config failed: {why}", peer=peer,
                      why=f.getErrorMessage())
            self.plan.failed(peer)

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: log.failure("config: the answer of {peer} failed", f,
                                           peer=peer))

    # -- taking a file ---------------------------------------------------------------------

    def check(self, take: Take) -> list[str]:
        """Why ``take`` is not a file of this cluster for this node (empty: it is)."""
        text, held = take.text, take.held
        if len(text.encode("utf-8", "replace")) > MAX_TEXT:
            return [f"{len(text)} characters: not a config file"]
        if file_epoch(text) != held.epoch:
            return [f"its epoch line says {file_epoch(text)}, {take.peer} announced "
                    f"{held.epoch}"]
        if seal_state(text, self.secret) != "sealed":
            return ["its seal is wrong: not a file made by fsha config push with this "
                    "cluster's secret"]
        if file_id(text) != held.file:
            return [f"it is not the file announced ({file_id(text)[:8]}, not "
                    f"{held.file[:8]})"]
        try:
            new = self.stager.validate(text)
        except Refused as e:
            return e.reasons
        if new.digest.hex() != held.digest:
            return [f"its config digest is {new.digest.hex()}, {take.peer} announced "
                    f"{held.digest}"]
        return []

    def _refuse(self, take: Take, reasons: list[str]) -> None:
        now = self.clock.seconds()
        refusal = self.plan.refuse(take, "; ".join(reasons), now)
        log.warn("config: epoch {epoch} (file {file}) from {peer} refused, nothing written "
                 "({count}x): {why}", epoch=take.held.epoch, file=take.held.file,
                 peer=take.peer, count=refusal.count, why=refusal.reason)
        self.stager.record_event("config-refused", epoch=take.held.epoch,
                                 digest=take.held.digest, source=take.peer,
                                 reason=refusal.reason)

    def take(self, take: Take) -> None:
        own, expected = self._current()
        if take.held.epoch <= own.epoch:
            return  # a push got there first
        reasons = self.check(take)
        if reasons:
            self._refuse(take, reasons)
            return
        new = self.stager.validate(take.text)
        path = self.stager.running.path
        try:
            on_disk: str | None = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            on_disk = None
        if on_disk != expected:
            self._refuse(take, [f"{path} changed since this node read it (edited by hand?): "
                                "not replaced; restart the node to run what is there, or "
                                "put the file back"])
            return
        try:
            write_atomically(path, take.text)
        except OSError as e:
            self._refuse(take, [f"cannot write {path}: {e.strerror or e}"])
            return
        self.taken += 1
        changes = diff(self.stager.running, new)
        restart = tuple(c.key for c in changes if not c.online)
        if not restart:
            self.pending = None
            self.stager.adopt(new, take.text, take.held.epoch, source=take.peer)
            log.info("config: caught up with epoch {epoch} from {peer} (digest {digest}): "
                     "{path} written and applied online: {changes}", epoch=take.held.epoch,
                     peer=take.peer, digest=take.held.digest, path=str(path),
                     changes="; ".join(map(str, changes)) or "no setting changes")
            return
        self.pending = Pending(take.held, take.text, take.peer, restart, self.clock.seconds())
        log.warn("config: epoch {epoch} from {peer} (digest {digest}) written to {path}, NOT "
                 "running: {keys} need(s) a restart; this node keeps running epoch "
                 "{running} until it is restarted (fsha restarts nothing by itself)",
                 epoch=take.held.epoch, peer=take.peer, digest=take.held.digest,
                 path=str(path), keys=", ".join(restart), running=self.stager.epoch)
        self.stager.record_event("config-pending", epoch=take.held.epoch,
                                 digest=take.held.digest, running=self.stager.epoch,
                                 source=take.peer, keys=list(restart))

    # -- status ----------------------------------------------------------------------------

    def stats(self) -> CatchUpStats:
        return CatchUpStats(self.taken, self.plan.refusals)

    def status(self) -> dict[str, Any]:
        now = self.clock.seconds()
        own = self.held()
        result = self.plan.status(own, now)
        problems = self.plan.problems(own, now)
        pending = self.pending
        if pending is not None:
            problems.insert(0, f"config epoch {pending.held.epoch} (digest "
                               f"{pending.held.digest[:8]}, from {pending.peer}) is in the "
                               f"file but this node still runs epoch {self.stager.epoch}: "
                               f"{', '.join(pending.keys)} need(s) a restart; nothing "
                               "restarts by itself: restart this node when convenient and "
                               "it runs the file")
            result["state"] = "restart needed"
        result.update(taken=self.taken, problems=problems, held=own.epoch,
                      pending=None if pending is None else {
                          "epoch": pending.held.epoch, "digest": pending.held.digest,
                          "from": pending.peer, "keys": list(pending.keys),
                          "age_s": round(now - pending.at, 1)})
        return result
