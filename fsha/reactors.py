"""What each part of fsha needs from the reactor, as narrow typing Protocols.

The reactor is passed in everywhere (library code never imports the global one); these
name the slice of it a constructor uses, so a reader sees what a part can do (schedule,
connect, listen, spawn) and a test knows which fake to pass (``Clock``,
``MemoryReactorClock``, the real reactor). Only ``fsha.tap.makeService``'s caller, twistd,
holds the whole reactor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall


class Scheduler(Protocol):
    """``IReactorTime``: the clock (``twisted.internet.task.Clock`` in tests)."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Any, *args: Any,
                  **kwargs: Any) -> IDelayedCall: ...


class ProcessReactor(Scheduler, Protocol):
    """A clock that can also spawn processes (``IReactorProcess``)."""

    def spawnProcess(self, processProtocol: Any, executable: bytes | str,
                     args: Sequence[bytes | str], env: Mapping[Any, Any] | None = None,
                     path: bytes | str | None = None, uid: int | None = None,
                     gid: int | None = None, usePTY: bool = False,
                     childFDs: Mapping[int, Any] | None = None) -> Any: ...


class NetReactor(Scheduler, Protocol):
    """A clock that can also connect and listen over TCP and TLS (``IReactorTCP``,
    ``IReactorSSL``; endpoints such as ``HostnameEndpoint`` take it)."""

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> Any: ...

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> Any: ...

    def listenSSL(self, port: int, factory: Any, contextFactory: Any,
                  backlog: int = 50, interface: str = "") -> Any: ...


class NodeReactor(NetReactor, ProcessReactor, Protocol):
    """Everything one node's service tree uses: the clock, TCP/TLS, UDP
    (``listenUDP``, the heartbeats), processes and a thread pool (the core DB writer)."""

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> Any: ...

    def callInThread(self, callable: Any, *args: Any, **kwargs: Any) -> None: ...

    def callFromThread(self, callable: Any, *args: Any,
                       **kwargs: Any) -> None: ...
