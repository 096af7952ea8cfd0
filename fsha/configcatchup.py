"""Catching up with the cluster's config, as pure decisions (the node side, which asks
the peers and writes the file, is :mod:`fsha.configfetch`).

A node that was down during an ``fsha config push``, or was restarted with an older
file, asks every peer it has a replication link to (at once, then every :data:`POLL`
seconds) which config it holds: epoch, config digest, file id (:func:`fsha.configplan.
file_id`) and seal state, with the file's text when the peer's epoch is above the
asker's. From those answers :class:`CatchUpPlan` decides what to take:

* only a *sealed* file (:func:`fsha.configplan.seal_state`, checked by the asker on the
  text itself: a peer's word is not trusted), which the node then validates exactly as a
  push (the node side);
* the highest epoch above its own held by peers that agree on it: two peers holding the
  same epoch with different files are a *conflict* (a push on each side of a partition),
  and that epoch is not taken by anyone (the status names both; a push of the wanted
  file settles it as the next epoch). A lower epoch above the node's own may be taken;
* not one refused in the last :data:`REFUSED_RETRY` seconds (an invalid file is counted
  and named, never written; it is tried again later, the cause may have been local);
* nothing while this node's own file is *hand-edited* (an epoch line whose seal does not
  match: edited after its push): fsha never overwrites an operator's edit, and never
  offers it either: such a file is the operator's to push;
* and only once every peer whose link is up has answered (or :data:`ANSWER_WAIT`
  seconds passed since its link came up), so two peers at different epochs give the same
  decision whatever the order of their answers.

Epochs only grow: the highest sealed epoch wins, wherever it was pushed. A node whose
sealed file is *above* the others' is simply ahead: the others take it from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

#: Seconds between two questions to the same peer (and after a failed one).
POLL: Final = 15.0
#: Seconds to wait for the peers' answers after a link came up before deciding alone.
ANSWER_WAIT: Final = 5.0
#: Seconds before a refused file is tried again.
REFUSED_RETRY: Final = 300.0


@dataclass(frozen=True, slots=True)
class Held:
    """The config a node holds: the one it runs, or a newer one in its file that needs a
    restart."""

    epoch: int
    digest: str  # the config digest (hex)
    file: str  # file_id of the text
    seal: str  # none | sealed | hand-edited


@dataclass(frozen=True, slots=True)
class Answer:
    held: Held
    text: str | None  # only when the peer's epoch is above the asker's
    at: float


@dataclass(slots=True)
class Refusal:
    peer: str
    reason: str
    count: int
    at: float


@dataclass(frozen=True, slots=True)
class Take:
    peer: str
    held: Held
    text: str


def _short(held: Held) -> str:
    return f"epoch {held.epoch} (digest {held.digest[:8]}, file {held.file[:8]})"


class CatchUpPlan:
    """What to ask and what to take, on the clock values it is given (no I/O)."""

    def __init__(self, poll: float = POLL, answer_wait: float = ANSWER_WAIT,
                 refused_retry: float = REFUSED_RETRY) -> None:
        self.poll = poll
        self.answer_wait = answer_wait
        self.refused_retry = refused_retry
        self.up: dict[str, float] = {}  # peers whose link is up -> since when
        self.asked: dict[str, float] = {}  # questions in flight -> when asked
        self.last_asked: dict[str, float] = {}
        self.answers: dict[str, Answer] = {}
        self.refused: dict[tuple[int, str], Refusal] = {}
        self.refusals = 0  # files refused since start, counted

    # -- links and questions ---------------------------------------------------------------

    def links(self, up: set[str], now: float) -> None:
        """The peers whose link is up now: a new one is asked at once; one gone is
        forgotten (its answer may be stale when it comes back)."""
        for peer in set(self.up) - up:
            del self.up[peer]
            self.asked.pop(peer, None)
            self.last_asked.pop(peer, None)
            self.answers.pop(peer, None)
        for peer in up - set(self.up):
            self.up[peer] = now

    def to_ask(self, now: float) -> list[str]:
        return sorted(p for p in self.up if p not in self.asked and (
            p not in self.last_asked or now - self.last_asked[p] >= self.poll))

    def asking(self, peer: str, now: float) -> None:
        self.asked[peer] = self.last_asked[peer] = now

    def answered(self, peer: str, held: Held, text: str | None, now: float) -> None:
        self.asked.pop(peer, None)
        if peer in self.up:
            self.answers[peer] = Answer(held, text, now)

    def failed(self, peer: str) -> None:
        """No answer (timeout, link down, a peer of a version without catch-up): asked
        again after :data:`POLL` seconds; what it said before still counts."""
        self.asked.pop(peer, None)

    # -- deciding --------------------------------------------------------------------------

    def refuse(self, take: Take, reason: str, now: float) -> Refusal:
        key = (take.held.epoch, take.held.file)
        old = self.refused.get(key)
        self.refused[key] = refusal = Refusal(take.peer, reason, (old.count if old else 0) + 1,
                                              now)
        self.refusals += 1
        return refusal

    def _newer(self, own: Held) -> dict[int, dict[str, list[str]]]:
        """epoch -> file -> peers, for the sealed files above ``own`` offered with text."""
        by: dict[int, dict[str, list[str]]] = {}
        for peer, answer in sorted(self.answers.items()):
            held = answer.held
            if held.epoch > own.epoch and held.seal == "sealed":
                by.setdefault(held.epoch, {}).setdefault(held.file, []).append(peer)
        return by

    def waiting(self, now: float) -> list[str]:
        """Peers not heard yet whose answer is still worth waiting for."""
        return sorted(p for p, since in self.up.items()
                      if p not in self.answers and now - since < self.answer_wait)

    def decide(self, own: Held, now: float) -> Take | None:
        """The file to take now, if any."""
        if own.seal == "hand-edited" or self.waiting(now):
            return None
        for epoch, files in sorted(self._newer(own).items(), reverse=True):
            if len(files) > 1:
                continue  # a conflict: nobody's file is more right than the other's
            file, peers = next(iter(files.items()))
            refusal = self.refused.get((epoch, file))
            if refusal is not None and now - refusal.at < self.refused_retry:
                continue
            for peer in peers:
                answer = self.answers[peer]
                if answer.text is not None:
                    return Take(peer, answer.held, answer.text)
        return None

    # -- status ----------------------------------------------------------------------------

    def problems(self, own: Held, now: float) -> list[str]:
        """What an operator should know, in words (empty when in step or ahead)."""
        found: list[str] = []
        newest = max((a.held for a in self.answers.values() if a.held.seal == "sealed"),
                     key=lambda h: h.epoch, default=None)
        if own.seal == "hand-edited":
            where = f"; the cluster holds {_short(newest)}" if newest else ""
            found.append(f"this node's config file was edited after its push (its epoch "
                         f"{own.epoch} line has no seal that matches the file: edited, the "
                         "line written by hand, or the cluster secret changed): fsha neither "
                         f"offers it to the other nodes nor replaces it{where}; push it "
                         "(fsha config push) to make it the cluster's, or put the "
                         "cluster's file back")
        for epoch, files in sorted(self._newer(own).items(), reverse=True):
            if len(files) > 1:
                found.append(f"config epoch {epoch} is held with different files: " + "; ".join(
                    f"{', '.join(peers)} file {file[:8]}" for file, peers in files.items())
                    + " (a push on each side of a partition?): neither is taken; push the "
                      "one you want (it becomes the next epoch)")
        for peer, answer in sorted(self.answers.items()):
            held = answer.held
            if held.epoch > own.epoch and held.seal == "hand-edited":
                found.append(f"{peer} holds a config file edited by hand ({_short(held)}, "
                             "seal wrong): not taken")
            elif held.epoch == own.epoch and held.file != own.file and own.epoch > 0:
                found.append(f"{peer} holds another file at this node's epoch {own.epoch} "
                             f"({peer}: file {held.file[:8]}, digest {held.digest[:8]}; "
                             f"here: file {own.file[:8]}): push the one you want")
        for (epoch, file), refusal in sorted(self.refused.items()):
            if now - refusal.at < self.refused_retry and epoch > own.epoch:
                found.append(f"config epoch {epoch} (file {file[:8]}) from {refusal.peer} "
                             f"refused ({refusal.count}x, last {now - refusal.at:.0f} s ago): "
                             f"{refusal.reason}")
        return found

    def status(self, own: Held, now: float) -> dict[str, Any]:
        """``state``: ``in step``, ``ahead`` (the others take from this node), ``behind``
        (a newer file is being taken), ``not taken`` (only conflicting or refused files
        are newer), ``conflict`` (a peer holds another file at this node's epoch),
        ``hand-edited``; what each peer holds; the refusals."""
        peers = {p: {"epoch": a.held.epoch, "digest": a.held.digest, "file": a.held.file,
                     "seal": a.held.seal} for p, a in sorted(self.answers.items())}
        newer = self._newer(own)
        takeable = [e for e, files in newer.items() if len(files) == 1 and not (
            (e, next(iter(files))) in self.refused
            and now - self.refused[(e, next(iter(files)))].at < self.refused_retry)]
        if own.seal == "hand-edited":
            state = "hand-edited"
        elif takeable:
            state = "behind"
        elif newer:  # only conflicts or refused files above: the problems say which
            state = "not taken"
        elif own.epoch > 0 and any(a.held.epoch == own.epoch and a.held.file != own.file
                                   for a in self.answers.values()):
            state = "conflict"
        elif self.answers and all(a.held.epoch < own.epoch for a in self.answers.values()):
            state = "ahead"
        else:
            state = "in step"
        return {"state": state, "peers": peers, "refusals": self.refusals,
                "waiting": self.waiting(now),
                "refused": [{"epoch": e, "file": f, "peer": r.peer, "reason": r.reason,
                             "count": r.count} for (e, f), r in sorted(self.refused.items())]}
