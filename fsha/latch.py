"""A one-way signal two parts share when each needs the other (they cannot both be the
other's constructor argument): the builder (``fsha.tap``) makes the latch first and hands it
to both, one sets it, the other reads it. No back reference is set after construction."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Latch", "Signal"]


class Signal(Protocol):
    """What the reading side uses of a :class:`Latch`."""

    @property
    def is_set(self) -> bool: ...


class Latch:
    """Unset until :meth:`set`, then set for good (e.g. the durable store's load over:
    the node's cold-start claims may go; the guard given up: FreeSWITCH is unusable)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    @property
    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
