"""A node's side of ``fsha config push``: stage a pushed config, activate it, or drop it.

The control endpoint (:mod:`fsha.nodecontrol`) calls :class:`ConfigStager` with the signed
requests of :mod:`fsha.cli.config`:

* ``stage``: the text is parsed as if it were this node's config file and checked for this
  node as ``fsha check-config FILE --node ME`` does (the file, the secret, its TLS key and
  certificate), the secret must be the one it runs with, and every difference from the
  running config must be one it applies online (:mod:`fsha.configplan`); the epoch must be
  above the one it runs. Otherwise it refuses, saying why, and keeps its config.
* ``activate``: the staged config (same epoch and digest) is written over the config file
  atomically (a temporary file in the same directory, fsync, rename, fsync of the
  directory: a crash leaves the old file or the new one), then applied to the running
  node (``apply``); a history event ``config`` records it.
* ``abort``: the staged config of that epoch and digest is dropped. A staged config not
  activated within :data:`fsha.configplan.STAGE_TTL` seconds is dropped too.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fsha.config import ClusterConfig, ConfigError, check_tls_files, choose_node
from fsha.configplan import (
    STAGE_TTL,
    Staged,
    activate_refusal,
    diff,
    file_epoch,
    parse_text,
    profile_refusals,
    sealed,
    stage_refusal,
)

log = Logger(namespace="fsha.config")


class Refused(Exception):
    """A push this node does not take; ``reasons`` are the lines that say why."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text``: the old file or the new one survives any crash; the
    file keeps its mode."""
    tmp = path.with_name(f".{path.name}.fsha-push.{os.getpid()}")  # nodes may share a file
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConfigStager:
    def __init__(self, running: ClusterConfig, me: str, secret: bytes, clock: IReactorTime,
                 apply: Callable[[ClusterConfig], dict[str, Any] | None],
                 record_event: Callable[..., None], ttl: float = STAGE_TTL,
                 calls: Callable[[int, str], int] | None = None) -> None:
        """``calls(slot_id, profile)``: the calls a profile carries (replicated), for
        refusing the removal of a profile with calls (None: not checked here; the slot's
        master still keeps such a profile running: fsha.slotchange)."""
        self.running = running
        self.me = me
        self.secret = secret
        self.clock = clock
        self.apply = apply
        self.record_event = record_event
        self.ttl = ttl
        self.calls = calls
        try:
            # the text this node runs (what "show" answers, whatever the file becomes)
            self.text: str | None = running.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            self.text = None
        self.epoch = file_epoch(self.text or "")
        self.staged: Staged | None = None

    def _current_staged(self) -> Staged | None:
        staged = self.staged
        if staged is not None and self.clock.seconds() - staged.at >= self.ttl:
            log.warn("config epoch {epoch} (digest {digest}) dropped: not activated within "
                     "{ttl:.0f} s", epoch=staged.epoch, digest=staged.digest.hex(),
                     ttl=self.ttl)
            self.staged = staged = None
        return staged

    def status(self) -> dict[str, Any]:
        staged = self._current_staged()
        return {"epoch": self.epoch, "digest": self.running.digest.hex(),
                "staged": None if staged is None else {
                    "epoch": staged.epoch, "digest": staged.digest.hex(),
                    "age_s": round(self.clock.seconds() - staged.at, 1)}}

    def show(self) -> dict[str, Any]:
        """The running config's text (for the push's diff), with its epoch and digest: as
        read at start-up or last activated, not whatever the file holds now."""
        if self.text is None:
            raise Refused([f"{self.running.path} could not be read at start-up"])
        return {"node": self.me, "epoch": self.epoch, "digest": self.running.digest.hex(),
                "path": str(self.running.path), "text": self.text}

    def check(self, text: str) -> ClusterConfig:
        """The pushed text as this node's config, checked for this node; Refused if not."""
        new = self.validate(text)
        restart = [f"{c} needs a restart ({c.why})" for c in diff(self.running, new)
                   if not c.online]
        if self.calls is not None:
            restart += profile_refusals(self.running, new, self.calls)
        if restart:
            raise Refused(restart)
        return new

    def validate(self, text: str) -> ClusterConfig:
        """``text`` as this node's config: parsed, this node in it, the secret it runs
        with, its TLS files there; Refused if not (a push and a catch-up alike)."""
        path = self.running.path
        try:
            new = parse_text(text, path)
            choose_node(new, self.me)
            if new.read_secret() != self.secret:
                raise ConfigError([f"{path}: cluster.secret_file: {new.secret_file} holds "
                                   "another secret than the one this node runs with: a "
                                   "whole-cluster restart"])
            check_tls_files(new, new.node(self.me))
        except ConfigError as e:
            raise Refused(e.problems) from None
        return new

    def stage(self, epoch: int, text: str) -> dict[str, Any]:
        new = self.check(text)
        now = self.clock.seconds()
        why = stage_refusal(self.epoch, self.running.digest, self._current_staged(), epoch,
                            new.digest, now, self.ttl)
        if why:
            raise Refused([why])
        self.staged = Staged(epoch, new.digest, sealed(text, epoch, self.secret), new, now)
        changes = [str(c) for c in diff(self.running, new)]
        log.info("config epoch {epoch} (digest {digest}) staged: {changes}", epoch=epoch,
                 digest=new.digest.hex(), changes="; ".join(changes) or "no setting changes")
        return {"node": self.me, "staged": epoch, "digest": new.digest.hex(),
                "changes": changes}

    def activate(self, epoch: int, digest: bytes) -> dict[str, Any]:
        staged = self._current_staged()
        why = activate_refusal(self.epoch, staged, epoch, digest, self.clock.seconds(),
                               self.ttl)
        if why:
            raise Refused([why])
        assert staged is not None
        path = self.running.path
        try:
            write_atomically(path, staged.text)
        except OSError as e:
            raise Refused([f"cannot write {path}: {e.strerror or e}; the old config stays"]
                          ) from None
        old = self.running
        applied = self.apply(staged.config) or {}  # what it began (fsha.slotchange)
        self.running, self.epoch, self.staged = staged.config, epoch, None
        self.text = staged.text
        log.info("config epoch {epoch} active (digest {digest}, was {previous}); {path} "
                 "written", epoch=epoch, digest=staged.digest.hex(),
                 previous=old.digest.hex(), path=str(path))
        self.record_event("config", digest=staged.digest.hex(), previous=old.digest.hex(),
                          epoch=epoch)
        return {**applied, "node": self.me, "active": epoch,
                "digest": staged.digest.hex()}

    def adopt(self, config: ClusterConfig, text: str, epoch: int, **event: Any) -> None:
        """A config already written to the file (a catch-up, :mod:`fsha.configfetch`)
        becomes the one this node runs: applied as an activation applies it."""
        old = self.running
        self.apply(config)
        self.running, self.epoch, self.text = config, epoch, text
        self.record_event("config", digest=config.digest.hex(), previous=old.digest.hex(),
                          epoch=epoch, **event)

    def abort(self, epoch: int, digest: bytes) -> dict[str, Any]:
        staged = self._current_staged()
        if staged is not None and (staged.epoch, staged.digest) == (epoch, digest):
            self.staged = None
            log.info("config epoch {epoch} dropped (the push was aborted)", epoch=epoch)
            return {"node": self.me, "dropped": epoch}
        return {"node": self.me, "dropped": None}
