"""Heartbeat transport: one UDP socket per cluster network, bound to this node's address.

Thin on purpose: bytes go to ``ClusterNode.datagram_received`` with the network index and
the source; the node's send functions go to ``transport.write``. A socket error on one
network (NIC down, no route) is raised to the node, which counts it and carries on.
"""

from __future__ import annotations

from twisted.application import internet, service
from twisted.internet.interfaces import IReactorUDP
from twisted.internet.protocol import DatagramProtocol

from fsha.config import Network
from fsha.node import Address, ClusterNode


class HeartbeatProtocol(DatagramProtocol):
    noisy = False

    def __init__(self, node: ClusterNode, network: Network) -> None:
        self.node = node
        self.network = network
        self._index = network.index

    def startProtocol(self) -> None:
        self.node.attach(self.network.name, self.send)
        self.node.add_drain(self.drain)

    def drain(self) -> None:
        """Read every datagram waiting in the socket now (the reactor would at its next
        turn): Twisted's UDP port reads until the socket is empty, or 256 KiB."""
        read = getattr(self.transport, "doRead", None)
        if read is not None:
            read()

    def datagramReceived(self, datagram: bytes, addr: Address) -> None:
        self.node.datagram_received(self._index, datagram, addr)

    def send(self, data: bytes, address: Address) -> None:
        if self.transport is None:
            raise OSError("socket not open")
        self.transport.write(data, address)


def heartbeat_services(node: ClusterNode, reactor: IReactorUDP) -> list[service.Service]:
    """One UDPServer per network, bound to this node's address on it."""
    services: list[service.Service] = []
    for net in node.config.networks:
        udp = internet.UDPServer(net.port, HeartbeatProtocol(node, net),
                                 interface=node.me.addresses[net.name], reactor=reactor)
        udp.setName(f"heartbeat-{net.name}")
        services.append(udp)
    return services
