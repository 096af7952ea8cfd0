"""A slot's floating IPs and profiles changed online (``fsha config push``): what this node
holds follows the new config without a slot move.

:class:`SlotChanges` sits between the node and the slot effects (it is the node's
``SlotOwner``). It remembers, per slot, every address it may have put up and every profile
it may have started (``held``), from the first step of a claim to the end of its release,
so that:

* a release (or the rollback of a failed claim) takes down the union of the config's
  addresses and of those still held, whatever config is in force when it runs: an address
  added by a change, or one a change failed to remove, is never left behind;
* the guard (:mod:`fsha.guard`) is told the same union before an address goes up, so that
  a fsha that dies in the middle of a change leaves nothing up either;
* at activation (:meth:`config_changed`) the master of a changed slot moves its own
  addresses (:func:`fsha.configplan.slot_actions`): the new ones up (with their gratuitous
  ARP), then the old ones down, through the same floating-IP backend and timeouts the
  takeover uses; its calls stay. Then it starts the added profiles and stops the removed
  ones that carry no call (with hot standby profiles every node does the profiles).
  A slave only runs with the new config: if it ever takes the slot over, it claims the new
  addresses.

A change that fails half-way is not left half-applied: if the new addresses cannot all be
put up, those that were are taken down again and the node lets the slot go
(:meth:`fsha.node.ClusterNode.resources_lost`), so the next candidate claims it with the
new config; an old address that cannot be taken down stays held (the release and the
guard still cover it) and the change is reported failed. A claim that was running when
the config changed (a takeover racing the activation) claims the addresses it started
with, then makes them follow the new config as the last step of the claim: a failure
there fails the claim, which is rolled back (the release covers both sets). A release that
begins during a change cancels it and waits for it before anything goes down, so an
address is never put up after its release.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fsha.config import ClusterConfig, FloatingIP, NodeConfig, SlotConfig
from fsha.configplan import SlotActions, slot_actions
from fsha.floating import FloatingIPBackend

log = Logger(namespace="fsha.config")

#: Finished changes kept for the status.
RECENT = 10


class Effects(Protocol):
    """The slot effects (:class:`fsha.takeover.effects.SlotEffects`)."""

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()
                ) -> Deferred[None]: ...

    def release(self, slot: SlotConfig) -> Deferred[None]: ...


class Profiles(Protocol):
    """Starting and stopping sofia profiles, and their calls (:class:`ProfileControl`)."""

    def start(self, profile: str) -> Deferred[Any]: ...

    def stop(self, profile: str) -> Deferred[Any]: ...

    def calls(self, profile: str) -> Deferred[int]: ...


class ProfileControl:
    """:class:`Profiles` over FreeSWITCH's API (:class:`fsha.fsapi.FSApi`), each call with
    ``timeout``."""

    def __init__(self, api: Any, timeout: float) -> None:
        self.api = api
        self.timeout = timeout

    def start(self, profile: str) -> Deferred[Any]:
        return self.api.sofia_profile(profile, "start")

    def stop(self, profile: str) -> Deferred[Any]:
        return self.api.sofia_profile(profile, "stop")

    def calls(self, profile: str) -> Deferred[int]:
        def count(entries: Any) -> int:
            return sum(e.sessions or 0 for e in entries
                       if e.type == "profile" and e.name == profile)
        return self.api.sofia_status(self.timeout).addCallback(count)


@dataclass(slots=True)
class _Held:
    """What this node may hold of one slot: put up / started and not yet confirmed gone."""

    ips: list[FloatingIP] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Change:
    """One change of a slot on this node, for the status and the tests."""

    seq: int  # numbered from 1 on this node
    slot: str
    actions: SlotActions
    state: str = "running"  # running, done, failed, cancelled
    error: str | None = None
    kept: list[str] = field(default_factory=list)  # removed profiles left running: why

    def as_status(self) -> dict[str, Any]:
        return {"seq": self.seq, "slot": self.slot, "state": self.state, "error": self.error,
                "added": [ip.address for ip in self.actions.add],
                "removed": [ip.address for ip in self.actions.remove],
                "started": list(self.actions.start), "stopped": list(self.actions.stop),
                "kept": list(self.kept)}


class SlotChanges:
    """See the module docstring. ``effects``: the slot effects; ``floating``: the same
    backend they use (``timeout`` per call: the config's floating-IP timeout);
    ``profiles``: FreeSWITCH's profiles (None: no FreeSWITCH connection, no profile
    step); ``on_held``: told each time the union of config and held resources changes
    (the guard's settings are rebuilt from :meth:`guarded`); ``record_event``: each
    finished change becomes a ``slot-change`` event (history, ``[notify]``)."""

    def __init__(self, effects: Effects, floating: FloatingIPBackend, clock: IReactorTime,
                 config: ClusterConfig, *, timeout: float, profiles: Profiles | None = None,
                 profile_timeout: float = 5.0,
                 on_held: Callable[[], object] | None = None,
                 record_event: Callable[..., object] | None = None) -> None:
        self.effects = effects
        self.floating = floating
        self.clock = clock
        self.config = config
        self.timeout = timeout
        self.profiles = profiles
        self.profile_timeout = profile_timeout
        self.on_held = on_held
        self.record_event = record_event  # the node's: history, [notify], status events
        self.hot_standby = config.takeover.hot_standby
        self.held: dict[int, _Held] = {}
        self.recent: deque[Change] = deque(maxlen=RECENT)
        self.seq = 0  # of the last change begun
        self._changing: dict[int, list[Deferred[None]]] = {}  # slot -> changes running
        # hot standby: the profiles every node runs, per slot (from the first change on)
        self.standby: dict[int, list[str]] = {}
        self._started_with = {s.slot_id: s.profiles for s in config.slots}
        self._guarded = self.guarded()

    # -- SlotOwner --------------------------------------------------------------------------

    def acquire(self, slot: SlotConfig, epoch: int, previous: NodeConfig | None, *,
                fence: bool = True, claimers: Sequence[NodeConfig] = ()) -> Deferred[None]:
        held = self.held.setdefault(slot.slot_id, _Held())
        _extend(held.ips, slot.ips)
        _extend(held.profiles, slot.profiles)
        self._tell_guard()
        d = self.effects.acquire(slot, epoch, previous, fence=fence, claimers=claimers)

        @inlineCallbacks
        def follow(_: object) -> Generator[Any, Any, None]:
            # the config changed during the claim (a takeover racing an activation): the
            # claim ends with this node's resources as the new config says
            yield self._change(slot.slot_id, holds=True)

        return d.addCallback(follow)

    def release(self, slot: SlotConfig) -> Deferred[None]:
        changing = list(self._changing.get(slot.slot_id, []))
        for d in reversed(changing):
            d.cancel()  # nothing goes up after this point: wait for them to settle
        wait: Deferred[Any] = defer.DeferredList(
            [d.addErrback(lambda _: None) for d in changing]) if changing \
            else defer.succeed(None)

        def go(_: object) -> Deferred[None]:
            held = self.held.get(slot.slot_id, _Held())
            ips = list(slot.ips)
            _extend(ips, held.ips)
            profiles = list(slot.profiles)
            _extend(profiles, held.profiles)
            return self.effects.release(replace(slot, ips=tuple(ips),
                                                profiles=tuple(profiles)))

        def released(result: object) -> object:
            self.held.pop(slot.slot_id, None)
            self._tell_guard()
            return result

        return wait.addCallback(go).addBoth(released)

    def claim_progress(self, slot: SlotConfig) -> float | None:
        progress = getattr(self.effects, "claim_progress", None)
        return progress(slot) if progress is not None else None

    # -- the config ---------------------------------------------------------------------------

    def guarded(self) -> dict[int, tuple[tuple[FloatingIP, ...], tuple[str, ...]]]:
        """Per slot: the config's addresses and profiles and those still held (what the
        guard must take down and stop if fsha dies)."""
        out = {}
        for slot in self.config.slots:
            held = self.held.get(slot.slot_id, _Held())
            ips, profiles = list(slot.ips), list(slot.profiles)
            _extend(ips, held.ips)
            _extend(profiles, held.profiles)
            out[slot.slot_id] = (tuple(ips), tuple(profiles))
        return out

    def _tell_guard(self) -> None:
        guarded = self.guarded()
        if guarded != self._guarded:
            self._guarded = guarded
            if self.on_held is not None:
                try:
                    self.on_held()
                except Exception:
                    log.failure("telling the guard the slots' addresses failed")

    def config_changed(self, new: ClusterConfig, holding: tuple[int, int] | None,
                       lose: Callable[[int, int, str], object]) -> dict[str, Any]:
        """Run with ``new`` from now on (the same slots, by :func:`fsha.configplan.diff`).
        ``holding``: the (slot, epoch) this node masters, if it does (a claim in progress
        follows the new config at its end: :meth:`acquire`); ``lose``: the node's
        ``resources_lost``, to let the slot go if its change fails. Returns what the
        activation's answer says of it: the changes it begins are numbered above
        ``slot_changes_after`` in :meth:`status`."""
        after = self.seq
        self.config = new
        self._tell_guard()  # a slave's guard covers the new addresses too
        slots = [holding[0]] if holding is not None else []
        if self.hot_standby and self.profiles is not None:
            slots = [s.slot_id for s in new.slots]  # every node runs every slot's profiles
        for slot_id in slots:
            holds = holding is not None and holding[0] == slot_id
            d = self._change(slot_id, holds=holds)
            if holds:
                assert holding is not None
                epoch = holding[1]

                def failed(f: Failure, slot_id: int = slot_id, epoch: int = epoch) -> None:
                    if f.check(defer.CancelledError):
                        return  # a release cancelled it: the slot is going anyway
                    reason = f.getErrorMessage() or f.type.__name__
                    lose(slot_id, epoch, f"its online config change failed: {reason}")
                d.addErrback(failed)
            d.addErrback(lambda f: log.failure("slot change bookkeeping failed", f))
        return {"slot_changes_after": after}

    def _change(self, slot_id: int, *, holds: bool) -> Deferred[None]:
        """Make slot ``slot_id``'s held resources follow the config, after the changes
        still running for it; fails if the addresses could not be put up (those that were
        are down again)."""
        running = self._changing.setdefault(slot_id, [])
        d: Deferred[None]
        if running:
            d = Deferred()
            running[-1].addBoth(lambda _: None if d.called else d.callback(None))
            d.addCallback(lambda _: self._run(slot_id, holds))
        else:
            d = self._run(slot_id, holds)
        running.append(d)

        def done(result: object) -> object:
            left = self._changing.get(slot_id, [])
            if d in left:
                left.remove(d)
            if not left:
                self._changing.pop(slot_id, None)
            return result
        return d.addBoth(done)

    def _run(self, slot_id: int, holds: bool) -> Deferred[None]:
        slot = self.config.slots[slot_id]
        held = self.held.get(slot_id)
        if held is None and not self.hot_standby:
            return defer.succeed(None)  # released meanwhile: nothing of it is ours
        ips = held.ips if held is not None and holds else []
        # hot standby: every node runs every slot's profiles, held or not
        profiles = self.standby.setdefault(slot_id, list(self._started_with[slot_id])) \
            if self.hot_standby else held.profiles if held is not None else []
        before = SlotConfig(slot.name, slot_id, tuple(ips), tuple(profiles))
        actions = slot_actions(before, slot, holds, self.hot_standby)
        if not actions:
            return defer.succeed(None)
        self.seq += 1
        change = Change(self.seq, slot.name, actions)
        self.recent.append(change)
        log.info("slot {slot}: config change: {what}", slot=slot.name,
                 what=actions.words("this node"))
        d = self._apply(ips, profiles, actions, change)

        def finished(result: object) -> object:
            if isinstance(result, Failure):
                cancelled = result.check(defer.CancelledError) is not None
                change.state = "cancelled" if cancelled else "failed"
                change.error = change.error or result.getErrorMessage() or \
                    result.type.__name__
                log.error("slot {slot}: config change {state}: {error}", slot=slot.name,
                          state=change.state, error=change.error)
            else:
                change.state = "failed" if change.error else "done"
                log.info("slot {slot}: config change {state}{error}", slot=slot.name,
                         state=change.state,
                         error=f": {change.error}" if change.error else "")
            if self.record_event is not None:
                fields = change.as_status()
                del fields["seq"]
                try:
                    self.record_event("slot-change", **fields)
                except Exception:
                    log.failure("recording the slot change failed")
            return result
        return d.addBoth(finished)

    @inlineCallbacks
    def _apply(self, ips: list[FloatingIP], profiles: list[str], actions: SlotActions,
               change: Change) -> Generator[Any, Any, None]:
        """``ips``, ``profiles``: the lists of what is held, kept true step by step."""
        name = actions.slot
        if actions.add:
            _extend(ips, actions.add)
            self._tell_guard()  # before the addresses go up
            try:
                yield self._bounded(self.floating.up(name, actions.add), self.timeout)
            except Exception:
                # back to a consistent state: none of the new addresses stays up
                try:
                    yield self._bounded(self.floating.down(name, actions.add), self.timeout)
                except Exception as e:
                    log.error("slot {slot}: taking the new addresses down again failed "
                              "({error}): they stay held until the slot is released",
                              slot=name, error=str(e) or type(e).__name__)
                else:
                    _discard(ips, actions.add)
                    self._tell_guard()
                raise
        if actions.remove:
            try:
                yield self._bounded(self.floating.down(name, actions.remove), self.timeout)
            except defer.CancelledError:
                raise
            except Exception as e:
                # still held: the release and the guard still take them down
                change.error = f"old addresses not taken down: {str(e) or type(e).__name__}"
            else:
                _discard(ips, actions.remove)
                self._tell_guard()
        if self.profiles is None:
            return
        for profile in actions.start:
            _extend(profiles, [profile])
            self._tell_guard()
            try:
                yield self._bounded(self.profiles.start(profile), self.profile_timeout)
            except defer.CancelledError:
                raise
            except Exception as e:
                change.error = f"profile {profile} not started: {str(e) or type(e).__name__}"
        for profile in actions.stop:
            try:
                calls = yield self._bounded(self.profiles.calls(profile), self.profile_timeout)
                if calls:
                    change.kept.append(f"{profile}: {calls} call(s)")
                    log.warn("slot {slot}: profile {profile} left running: it carries "
                             "{calls} call(s)", slot=name, profile=profile, calls=calls)
                    continue
                yield self._bounded(self.profiles.stop(profile), self.profile_timeout)
            except defer.CancelledError:
                raise
            except Exception as e:
                change.error = f"profile {profile} not stopped: {str(e) or type(e).__name__}"
                continue
            _discard(profiles, [profile])
            self._tell_guard()

    def _bounded(self, d: Deferred[Any], timeout: float) -> Deferred[Any]:
        return d.addTimeout(timeout, self.clock)

    def status(self) -> list[dict[str, Any]]:
        return [c.as_status() for c in self.recent]

    def held_status(self) -> dict[str, dict[str, list[str]]]:
        """Per slot this node holds or claims: the addresses it may hold and the profiles
        it may run (the config's, or more while a change runs or failed)."""
        names = {s.slot_id: s.name for s in self.config.slots}
        return {names.get(slot_id, str(slot_id)): {
            "ips": [ip.address for ip in held.ips], "profiles": list(held.profiles)}
            for slot_id, held in sorted(self.held.items())}


def _extend(into: list[Any], items: Sequence[Any]) -> None:
    into.extend(i for i in items if i not in into)


def _discard(into: list[Any], items: Sequence[Any]) -> None:
    into[:] = [i for i in into if i not in items]
