"""fsha.wire.netlink: the golden vectors of docs/protocol/netlink.rst, replies the kernel
sent (captured), malformed input, and a property: every request decodes to what it asks."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fsha.wire import netlink
from tests.test_heartbeat_codec import parse_doc_vectors

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "netlink.rst"
MAC = bytes.fromhex("020000000001")


def vectors() -> dict[str, bytes]:
    return parse_doc_vectors(DOC.read_text())


class GoldenRequestTests(SynchronousTestCase):
    def test_requests_are_the_documented_bytes(self) -> None:
        doc = vectors()
        built = {
            "addr-add-v4": netlink.addr_request("add", "198.18.0.101", 24, 3, 1),
            "addr-del-v4": netlink.addr_request("del", "198.18.0.101", 24, 3, 2),
            "addr-add-v6": netlink.addr_request("add", "2001:db8::1", 64, 3, 3),
            "addr-dump": netlink.dump_request(4),
            "garp": netlink.garp(MAC, "198.18.0.101"),
        }
        for name, data in built.items():
            self.assertEqual(data.hex(), doc[name].hex(), name)

    def test_every_documented_vector_is_tested(self) -> None:
        self.assertEqual(set(vectors()), {
            "addr-add-v4", "addr-del-v4", "addr-add-v6", "addr-dump", "garp", "reply-ack",
            "reply-exists", "reply-address", "reply-done"})

    def test_ipv6_delete_has_no_nodad_flag(self) -> None:
        data = netlink.addr_request("del", "2001:db8::1", 64, 3, 9)
        self.assertEqual(data[18], 0)  # ifaddrmsg flags

    def test_bad_requests(self) -> None:
        self.assertRaises(ValueError, netlink.addr_request, "add", "198.18.0.1", 33, 1, 1)
        self.assertRaises(ValueError, netlink.addr_request, "add", "2001:db8::1", 129, 1, 1)
        self.assertRaises(ValueError, netlink.addr_request, "replace", "198.18.0.1", 24, 1, 1)
        self.assertRaises(ValueError, netlink.garp, MAC[:5], "198.18.0.1")
        self.assertRaises(ValueError, netlink.garp, MAC, "2001:db8::1")


class GoldenReplyTests(SynchronousTestCase):
    def test_ack(self) -> None:
        self.assertEqual(netlink.parse_messages(vectors()["reply-ack"]),
                         [netlink.Ack(1, 0, "")])

    def test_error_with_the_kernels_message(self) -> None:
        self.assertEqual(netlink.parse_messages(vectors()["reply-exists"]),
                         [netlink.Ack(2, 17, "ipv4: Address already assigned")])

    def test_uncapped_error_quotes_the_request_before_its_message(self) -> None:
        request = netlink.addr_request("add", "198.18.0.101", 24, 3, 7)
        text = b"boom\0"
        tlv = (4 + len(text)).to_bytes(2, "little") + b"\x01\x00" + text + b"\0" * 3
        body = (-22).to_bytes(4, "little", signed=True) + request + tlv
        header = (16 + len(body)).to_bytes(4, "little") + b"\x02\x00\x00\x02" + \
            (7).to_bytes(4, "little") + b"\0" * 4
        self.assertEqual(netlink.parse_messages(header + body), [netlink.Ack(7, 22, "boom")])

    def test_address_and_done(self) -> None:
        doc = vectors()
        self.assertEqual(netlink.parse_messages(doc["reply-address"] + doc["reply-done"]), [
            netlink.AddressEntry(3, 3, "198.18.0.101", 24, 4, "fsha0"), netlink.Done(3)])

    def test_other_message_types_are_skipped(self) -> None:
        link = (20).to_bytes(4, "little") + b"\x10\x00\x02\x00" + b"\0" * 12
        self.assertEqual(netlink.parse_messages(link + vectors()["reply-done"]),
                         [netlink.Done(3)])

    def test_truncated_input_is_a_decode_error(self) -> None:
        data = vectors()["reply-address"]
        for cut in (20, 40, len(data) - 1):
            with self.subTest(cut=cut):
                self.assertRaises(netlink.NetlinkDecodeError, netlink.parse_messages,
                                  data[:cut])
        bad_attr = bytearray(data)
        bad_attr[24] = 0xFF  # first attribute's length runs past the message
        self.assertRaises(netlink.NetlinkDecodeError, netlink.parse_messages, bytes(bad_attr))
        short_error = (20).to_bytes(4, "little") + b"\x02\x00\x00\x00" + b"\0" * 12
        self.assertRaises(netlink.NetlinkDecodeError, netlink.parse_messages, short_error)


class PropertyTests(SynchronousTestCase):
    @given(st.one_of(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
        st.tuples(st.ip_addresses(v=6), st.integers(0, 128))),
        st.integers(1, 2**31 - 1), st.integers(0, 2**32 - 1))
    def test_an_add_request_decodes_to_its_address(
            self, addr: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], index: int,
            sequence: int) -> None:
        ip, prefix = addr
        data = netlink.addr_request("add", str(ip), prefix, index, sequence)
        self.assertEqual(len(data) % 4, 0)
        self.assertEqual(netlink.parse_messages(data), [
            netlink.AddressEntry(sequence, index, str(ip), prefix, ip.version, "")])

    @given(st.binary(max_size=200))
    def test_garbage_decodes_or_raises_the_codecs_error(self, data: bytes) -> None:
        try:
            netlink.parse_messages(data)
        except netlink.NetlinkDecodeError:
            pass
