"""A live slot's floating IP changed by ``fsha config push`` on real ``twistd`` nodes
(loopback backend, simulators): the master moves its own addresses and starts the profile
that serves the new one while a client probes it; no slot move, calls intact, no address
ever held by two nodes (every node's ``config.held`` watched throughout); a slot appended
in the same push is claimed by the spare. Then the master
is killed: its guard (told the new settings by a second HELLO) stops the new profile too,
and the successor claims the new address and recovers the calls."""

from __future__ import annotations

import socket
import subprocess
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.harness import FSHA, LoopbackCluster, wait_for

NEW_IP = "127.0.10.51"


def options(ip: str, port: int, timeout: float = 0.5) -> bytes | None:
    """One SIP OPTIONS to ``ip:port``; its answer, or None."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        me = s.getsockname()[1]
        s.sendto(f"OPTIONS sip:{ip}:{port} SIP/2.0\r\n"
                 f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK1;rport\r\n"
                 f"From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:{ip}>\r\n"
                 f"Call-ID: probe-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n".encode(),
                 (ip, port))
        return s.recvfrom(65535)[0]
    except OSError:
        return None
    finally:
        s.close()


class Watch(threading.Thread):
    """Reads every node's status until stopped (bounded): any address in two nodes'
    ``config.held`` at once is recorded."""

    def __init__(self, cluster: LoopbackCluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop = threading.Event()
        self.overlaps: list[str] = []
        self.reads = 0

    def run(self) -> None:
        for _ in range(20_000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            held: dict[str, str] = {}
            for name, st in self.cluster.statuses().items():
                for slot in (st.get("config") or {}).get("held", {}).values():
                    for address in slot["ips"]:
                        if address in held:
                            self.overlaps.append(f"{address} on {held[address]} and {name}")
                        held[address] = name
            self.reads += 1


class SlotAddressChangeTests(SynchronousTestCase):
    def test_a_live_slot_moves_to_a_new_address_without_a_move(self) -> None:
        with LoopbackCluster(nodes=3, slots=1, interval_ms=50, dead_after_ms=250) as c:
            # every simulator can serve the new address with one more profile (a real
            # FreeSWITCH: a profile bound to it); only the master starts it
            c.sim_args = ["--define-profile", f"slot1x={NEW_IP}:{c.sip_port}",
                          "--define-profile", f"slot2=127.0.10.2:{c.sip_port}"]
            c.start()
            c.wait_converged(60)
            master = c.owner("slot1")
            assert master is not None
            epoch = next(s["epoch"] for s in c.status(c.node(master))["slots"])
            uuids = c.sim_control(master, "/calls", {"profile": "slot1", "count": 10,
                                                     "answer": True})["uuids"]
            self.assertIsNotNone(options("127.0.10.1", c.sip_port))
            self.assertIsNone(options(NEW_IP, c.sip_port, 0.2))

            text = c.config_path.read_text()
            old_ip = 'address = "127.0.10.1/32"'
            self.assertIn(old_ip, text)
            new_file = c.dir / "new.toml"
            self.assertIn('profiles = ["slot1"]', text)
            # and a slot appended, which the spare claims
            new_file.write_text(text.replace(old_ip, f'address = "{NEW_IP}/32"').replace(
                'profiles = ["slot1"]', 'profiles = ["slot1", "slot1x"]')
                + '\n[[slot]]\nname = "slot2"\nprofiles = ["slot2"]\n'
                'ip = [{ address = "127.0.10.2/32", interface = "lo" }]\n')
            push = [*FSHA, "config", "push", str(new_file), "--config", str(c.config_path)]
            dry = subprocess.run([*push, "--dry-run"], capture_output=True, text=True,
                                 timeout=120)
            self.assertEqual(dry.returncode, 0, dry.stdout + dry.stderr)
            self.assertIn(f"slot1: {NEW_IP}/32 added on {master}, 127.0.10.1/32 removed",
                          dry.stdout)
            self.assertIn("slot2: added (127.0.10.2/32; profiles slot2): claimed by ",
                          dry.stdout)

            watch = Watch(c)
            watch.start()
            try:
                done = subprocess.run(push, capture_output=True, text=True, timeout=120)
                self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
                self.assertIn(f"slot1 on {master}: {NEW_IP} added, 127.0.10.1 removed, "
                              "profile slot1x started (done)", done.stdout)
                answer: Any = wait_for("the new address answers",
                                       lambda: options(NEW_IP, c.sip_port), 30)
                self.assertIn(b"SIP/2.0 200", answer)
                spare = wait_for("slot2 claimed", lambda: c.owner("slot2"), 30)
                self.assertIn(b"SIP/2.0 200", wait_for(
                    "the appended slot answers", lambda: options("127.0.10.2", c.sip_port),
                    30))
                wait_for("the watch saw it all", lambda: watch.reads > 3, 30)
            finally:
                watch.stop.set()
                watch.join(30)
            self.assertEqual(watch.overlaps, [])
            statuses = c.statuses()
            held = {name: st["config"]["held"] for name, st in statuses.items()}
            self.assertEqual(held[master], {"slot1": {"ips": [NEW_IP],
                                                      "profiles": ["slot1", "slot1x"]}})
            self.assertEqual(held[spare], {"slot2": {"ips": ["127.0.10.2"],
                                                     "profiles": ["slot2"]}})
            self.assertEqual([h for name, h in held.items() if name not in (master, spare)],
                             [{}])
            # no move: the same master, the same epoch, its calls all up
            self.assertEqual(c.owner("slot1"), master)
            self.assertEqual(next(s["epoch"] for s in statuses[master]["slots"]), epoch)
            live = {call["uuid"] for call in c.sim_control(master, "/calls")["calls"]}
            self.assertTrue(set(uuids) <= live, live)
            self.assertFalse([e for st in statuses.values() for e in st["events"]
                              if e["event"] in ("claim", "release")
                              and e.get("slot") == "slot1" and e.get("epoch", 0) > epoch])
            # only the master runs the new address's profile
            running = [n.name for n in c.nodes if c.sim_control(n.name, "/status")
                       ["profiles"]["slot1x"]["state"] == "running"]
            self.assertEqual(running, [master])

            # kill -9 the master's fsha: its guard stops both profiles (the new one
            # included, else the successor could not bind the new address), the successor
            # claims with the new config and recovers the calls
            c.kill(master)
            successor = wait_for("slot1 taken over", lambda: c.owner("slot1") not in
                                 (None, master) and c.owner("slot1"), 60)
            status = c.status(c.node(successor))
            self.assertEqual(status["config"]["held"],
                             {"slot1": {"ips": [NEW_IP], "profiles": ["slot1", "slot1x"]}})
            [report] = [e for e in status["events"] if e["event"] == "takeover-acquire"
                        and e["ok"] and e["slot"] == "slot1"]
            self.assertEqual(report["calls_recovered"], len(uuids), report)
            self.assertIn(b"SIP/2.0 200", wait_for("the new address answers again",
                                                   lambda: options(NEW_IP, c.sip_port), 30))
            profiles = c.sim_control(master, "/status")["profiles"]
            self.assertEqual({p: profiles[p]["state"] for p in ("slot1", "slot1x")},
                             {"slot1": "stopped", "slot1x": "stopped"})
