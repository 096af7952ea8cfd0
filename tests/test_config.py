"""The cluster config: the examples load, and every mistake is one line naming file and key."""

from __future__ import annotations

import copy
import io
import os
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from fsha.cli.check_config import main
from fsha.config import (
    ConfigError,
    FencingConfig,
    LimitsConfig,
    TakeoverConfig,
    choose_node,
    load_config,
    parse_config,
    read_redis_password,
)
from fsha.takeover import TakeoverTimeouts

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "conf" / "demo.toml"
PRODUCTION = ROOT / "conf" / "production.example.toml"


def demo_raw() -> dict[str, Any]:
    return tomllib.loads(DEMO.read_text())


class ExamplesTests(SynchronousTestCase):
    def test_demo_loads(self) -> None:
        config = load_config(DEMO)
        self.assertEqual(config.name, "demo")
        self.assertEqual([n.name for n in config.nodes], ["fs1", "fs2", "fs3"])
        self.assertEqual([s.name for s in config.slots], ["slot1", "slot2"])
        self.assertEqual(config.quorum, 2)
        self.assertEqual(config.heartbeat_interval, 0.05)
        self.assertEqual(config.dead_after, 0.2)
        self.assertEqual(config.discovery, 0.3)  # default: dead_after + 2 intervals
        self.assertEqual(config.node("fs2").addresses, {"A": "127.0.1.2", "B": "127.0.2.2"})
        self.assertEqual(config.secret_file, DEMO.parent / "demo.secret")
        self.assertEqual(len(config.digest), 8)
        self.assertEqual(len(config.read_secret()) >= 16, True)

    def test_production_example_loads(self) -> None:
        config = load_config(PRODUCTION)
        self.assertEqual(len(config.nodes), 4)
        self.assertEqual(config.quorum, 3)
        self.assertEqual(config.floating_ip.backend, "ip")
        self.assertEqual(config.slot("trunk").profiles, ("trunk-in", "trunk-out"))
        assert config.tls is not None
        self.assertEqual(config.tls.cert_for("fs2"), PRODUCTION.parent / "pki" / "fs2.crt")

    def test_digest_is_stable_and_sensitive(self) -> None:
        a = parse_config(demo_raw(), DEMO)
        b = parse_config(demo_raw(), DEMO)
        self.assertEqual(a.digest, b.digest)
        raw = demo_raw()
        raw["node"][2]["priority"] = 99
        self.assertNotEqual(parse_config(raw, DEMO).digest, a.digest)
        raw = demo_raw()
        raw["node"][0]["esl"]["password"] = "other"  # node-local secret: not in the digest
        self.assertEqual(parse_config(raw, DEMO).digest, a.digest)


class ValidationTests(SynchronousTestCase):
    def problems(self, mutate: Any) -> list[str]:
        raw = copy.deepcopy(demo_raw())
        mutate(raw)
        with self.assertRaises(ConfigError) as caught:
            parse_config(raw, DEMO)
        for line in caught.exception.problems:
            self.assertTrue(line.startswith(f"{DEMO}: "), line)
            self.assertNotIn("\n", line)
        return caught.exception.problems

    def assertProblem(self, mutate: Any, key: str, text: str) -> None:
        problems = self.problems(mutate)
        wanted = f"{DEMO}: {key}: "
        matching = [p for p in problems if p.startswith(wanted)]
        self.assertTrue(matching, f"no problem for {key!r} in {problems}")
        self.assertIn(text, matching[0])

    def test_unknown_keys(self) -> None:
        self.assertProblem(lambda r: r["cluster"].update(hartbeat_interval_ms=5),
                           "cluster.hartbeat_interval_ms", "unknown key")
        self.assertProblem(lambda r: r.update(nodes=[]), "nodes", "unknown key")
        self.assertProblem(lambda r: r["node"][1].update(prio=3), "node.fs2.prio", "unknown key")
        self.assertProblem(lambda r: r["node"][1]["esl"].update(pass_word="x"),
                           "node.fs2.esl.pass_word", "unknown key")

    def test_status_on_every_interface_refused(self) -> None:
        for host in ("0.0.0.0", "[::]"):
            def mutate(r: Any, host: str = host) -> None:
                r["node"][1]["status"] = f"{host}:17420"
            self.assertProblem(mutate, "node.fs2.status", "listens on every interface")
        raw = demo_raw()
        raw["node"][1]["status"] = "[::1]:17420"  # loopback v6 is fine
        parse_config(raw, DEMO)

    def test_registration_db(self) -> None:
        raw = copy.deepcopy(demo_raw())
        raw["node"][0]["esl"]["core_db"] = "/var/lib/freeswitch/db/core.db"
        raw["node"][1]["esl"]["core_db"] = "/srv/fs/core.db"
        raw["node"][1]["esl"]["registration_db"] = "regs/{profile}.sqlite"
        raw["node"][2]["esl"].pop("core_db", None)
        config = parse_config(raw, DEMO)
        fs1, fs2, fs3 = config.nodes
        # default: sofia's dbname in the core DB's folder; relative: to that folder
        self.assertEqual(fs1.registration_db_for("slot1"),
                         Path("/var/lib/freeswitch/db/sofia_reg_slot1.db"))
        self.assertEqual(fs2.registration_db_for("p"), Path("/srv/fs/regs/p.sqlite"))
        self.assertIsNone(fs3.registration_db_for("slot1"))  # no core DB: nothing restored
        self.assertProblem(lambda r: r["node"][0]["esl"].update(registration_db="x.db"),
                           "node.fs1.esl.registration_db", "must contain {profile}")
        self.assertProblem(lambda r: r["node"][0]["esl"].update(
            core_db=None, registration_db="/x/{profile}.db") or r["node"][0]["esl"].pop(
            "core_db"), "node.fs1.esl.registration_db", "needs core_db")

    def test_missing_keys(self) -> None:
        self.assertProblem(lambda r: r["cluster"].pop("name"), "cluster.name", "missing")
        self.assertProblem(lambda r: r.pop("cluster"), "cluster", "missing")
        self.assertProblem(lambda r: r.pop("node"), "node", "missing")
        self.assertProblem(lambda r: r["node"][0].pop("stream"), "node.fs1.stream", "missing")
        self.assertProblem(lambda r: r["node"][0]["esl"].pop("password"),
                           "node.fs1.esl.password", "missing")
        self.assertProblem(lambda r: r["node"][0].pop("esl"), "node.fs1.esl", "missing")
        self.assertProblem(lambda r: r["slot"][0].pop("profiles"), "slot.slot1.profiles",
                           "missing")

    def test_wrong_types(self) -> None:
        self.assertProblem(lambda r: r["cluster"].update(heartbeat_interval_ms="50"),
                           "cluster.heartbeat_interval_ms", "must be an integer, not a string")
        self.assertProblem(lambda r: r["network"][0].update(port=True), "network.A.port",
                           "must be an integer, not a boolean")
        self.assertProblem(lambda r: r["network"][0].update(port=70000), "network.A.port",
                           "1-65535")
        self.assertProblem(lambda r: r["node"][0].update(stream="127.0.1.1"),
                           "node.fs1.stream", "IP:PORT")
        self.assertProblem(lambda r: r["node"][0]["address"].update(A="fs1.example"),
                           "node.fs1.address.A", "not an IP address")
        self.assertProblem(lambda r: r.update(node={"name": "x"}), "node",
                           "array of tables")
        self.assertProblem(lambda r: r["slot"][0]["ip"][0].update(address="127.0.10.1"),
                           "slot.slot1.ip[0].address", "prefix length")

    def test_duplicates(self) -> None:
        self.assertProblem(lambda r: r["node"][1].update(name="fs1"), "node.fs1.name",
                           "duplicate node name fs1")
        self.assertProblem(lambda r: r["node"][1]["address"].update(B="127.0.2.1"),
                           "node.fs2.address.B", "duplicate address 127.0.2.1")
        self.assertProblem(lambda r: r["node"][2].update(stream="127.0.1.1:17410"),
                           "node.fs3.stream", "duplicate endpoint")
        self.assertProblem(lambda r: r["slot"][1].update(profiles=["slot1"]),
                           "slot.slot2.profiles[0]", "duplicate profile")
        self.assertProblem(lambda r: r["slot"][1]["ip"][0].update(address="127.0.10.1/32"),
                           "slot.slot2.ip[0].address", "duplicate floating IP")
        self.assertProblem(lambda r: r["slot"][1]["ip"][0].update(address="127.0.1.3/32"),
                           "slot.slot2.ip[0].address", "also a node address")
        self.assertProblem(lambda r: r["network"][1].update(name="A"), "network.A.name",
                           "duplicate network name")

    def test_node_without_address_on_a_network(self) -> None:
        self.assertProblem(lambda r: r["node"][2]["address"].pop("B"), "node.fs3.address.B",
                           "every node needs an address on network B")
        self.assertProblem(lambda r: r["node"][2]["address"].update(C="127.0.5.3"),
                           "node.fs3.address.C", "names no configured [[network]]")

    def test_timings(self) -> None:
        self.assertProblem(lambda r: r["cluster"].update(dead_after_ms=99),
                           "cluster.dead_after_ms", "shorter than two heartbeat intervals")
        self.assertProblem(lambda r: r["cluster"].update(heartbeat_interval_ms=1),
                           "cluster.heartbeat_interval_ms", "must be 5-10000")
        # a starting node casts no "dead" vote until it has listened a dead-after time
        self.assertProblem(lambda r: r["cluster"].update(discovery_ms=150),
                           "cluster.discovery_ms", "shorter than dead_after_ms")

    def test_quorum(self) -> None:
        for value in ("most", 0, 4):
            self.assertProblem(lambda r, v=value: r["cluster"].update(quorum=v),
                               "cluster.quorum", "majority")
        raw = demo_raw()
        raw["cluster"]["quorum"] = "none"
        self.assertEqual(parse_config(raw, DEMO).quorum, 1)
        raw["cluster"]["quorum"] = 3
        self.assertEqual(parse_config(raw, DEMO).quorum, 3)

    def test_more_slots_than_nodes(self) -> None:
        def mutate(r: dict[str, Any]) -> None:
            for i in (3, 4):
                r["slot"].append({"name": f"slot{i}", "profiles": [f"p{i}"],
                                  "ip": [{"address": f"127.0.10.{i}/32", "interface": "lo"}]})
        self.assertProblem(mutate, "slot", "4 slots but only 3 nodes")

    def test_floating_ip_and_tls(self) -> None:
        self.assertProblem(lambda r: r["floating_ip"].update(backend="vrrp"),
                           "floating_ip.backend", "must be one of loopback, ip, command")
        self.assertProblem(lambda r: r["floating_ip"].update(backend="command"),
                           "floating_ip.command", "needs the argv")
        self.assertProblem(lambda r: r.update(tls={"ca": "ca", "cert": "x.crt", "key": "{node}"}),
                           "tls.cert", "must contain {node}")

    def test_collects_every_problem(self) -> None:
        def mutate(r: dict[str, Any]) -> None:
            r["cluster"]["quorum"] = "most"
            r["node"][0]["priority"] = "high"
            r["slot"][1]["profiles"] = ["has space"]
        self.assertEqual(len(self.problems(mutate)), 3)


class FileTests(SynchronousTestCase):
    def write(self, text: str, secret: bytes | None = b"0123456789abcdef0123") -> Path:
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "cluster.toml"
        path.write_text(text)
        if secret is not None:
            secret_path = folder / "demo.secret"
            secret_path.write_bytes(secret)
            os.chmod(secret_path, 0o600)
        return path

    def run_check(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_check_config_ok(self) -> None:
        path = self.write(DEMO.read_text())
        code, out, err = self.run_check(str(path))
        self.assertEqual((code, err), (0, ""))
        self.assertIn("OK: cluster 'demo', 3 nodes, 2 slots", out)

    def test_check_config_bad_toml(self) -> None:
        path = self.write("[cluster\nname = 1\n")
        code, _out, err = self.run_check(str(path))
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn(f"{path}: not valid TOML", err)

    def test_check_config_missing_file_and_secret(self) -> None:
        code, _, err = self.run_check("/nonexistent/cluster.toml")
        self.assertEqual(code, 2)
        self.assertIn("/nonexistent/cluster.toml: cannot read", err)
        path = self.write(DEMO.read_text(), secret=b"short")
        code, _, err = self.run_check(str(path))
        self.assertEqual(code, 2)
        self.assertIn("cluster.secret_file", err)
        self.assertIn("at least 16", err)

    def test_check_config_warns_on_readable_secret(self) -> None:
        path = self.write(DEMO.read_text())
        os.chmod(path.parent / "demo.secret", 0o644)
        code, _, err = self.run_check(str(path))
        self.assertEqual(code, 0)
        self.assertIn("chmod 600", err)

    def test_check_config_unknown_node(self) -> None:
        path = self.write(DEMO.read_text())
        code, _, err = self.run_check(str(path), "--node", "fs9")
        self.assertEqual(code, 2)
        self.assertIn("no node named 'fs9'", err)


    def test_check_config_node_needs_its_tls_key(self) -> None:
        text = DEMO.read_text().replace(
            "[floating_ip]", '[tls]\nca = "pki/ca.crt"\ncert = "pki/{node}.crt"\n'
                             'key = "pki/{node}.key"\n\n[floating_ip]')
        path = self.write(text)
        pki = path.parent / "pki"
        pki.mkdir()
        for name in ("ca.crt", "fs2.crt", "fs2.key", "fs1.crt"):
            (pki / name).write_text("x")
        self.assertEqual(self.run_check(str(path), "--node", "fs2")[0], 0)
        code, _, err = self.run_check(str(path), "--node", "fs1")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertIn(f"tls.key: {pki / 'fs1.key'} does not exist", err)
        self.assertIn("fsha certs issue fs1", err)

    def test_check_config_warns_on_a_node_without_core_db(self) -> None:
        text = DEMO.read_text().replace(', core_db = "/tmp/fs3-core.db"', "")
        code, out, err = self.run_check(str(self.write(text)))
        self.assertEqual(code, 0)
        self.assertEqual(err.count("no esl.core_db"), 1)
        self.assertIn("node fs3: no esl.core_db: it can never recover", err)
        self.assertIn("3 nodes, 2 slots, 2 networks, quorum majority (2 of 3)", out)


class ChooseNodeTests(SynchronousTestCase):
    def test_by_name_and_by_local_address(self) -> None:
        config = load_config(DEMO)
        self.assertEqual(choose_node(config, "fs3").name, "fs3")
        local = {"127.0.1.2", "127.0.2.2"}
        self.assertEqual(choose_node(config, None, lambda ip: ip in local).name, "fs2")

    def test_ambiguous_or_absent(self) -> None:
        config = load_config(DEMO)
        with self.assertRaises(ConfigError) as caught:
            choose_node(config, None, lambda ip: True)
        self.assertIn("several nodes", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            choose_node(config, None, lambda ip: False)
        self.assertIn("pass --node NAME", str(caught.exception))


class FencingConfigTests(SynchronousTestCase):
    """The optional ``[fencing]`` section."""

    problems = ValidationTests.problems
    assertProblem = ValidationTests.assertProblem

    def test_absent_by_default(self) -> None:
        self.assertIsNone(parse_config(demo_raw(), DEMO).fencing)

    def test_valid_with_defaults_and_relative_path(self) -> None:
        raw = demo_raw()
        raw["fencing"] = {"command": ["bin/fence-node", "--via", "ipmi"]}
        config = parse_config(raw, DEMO)
        self.assertEqual(config.fencing, FencingConfig(
            (str(DEMO.parent / "bin" / "fence-node"), "--via", "ipmi"), 10.0, True))
        raw["fencing"] = {"command": ["fence_ipmi"], "timeout_ms": 2500, "required": False}
        self.assertEqual(parse_config(raw, DEMO).fencing,
                         FencingConfig(("fence_ipmi",), 2.5, False))

    def test_not_in_the_digest(self) -> None:
        raw = demo_raw()
        raw["fencing"] = {"command": ["/usr/local/bin/fence"], "required": False}
        self.assertEqual(parse_config(raw, DEMO).digest, parse_config(demo_raw(), DEMO).digest)

    def test_unknown_key(self) -> None:
        self.assertProblem(lambda r: r.update(fencing={"command": ["x"], "timeout": 5}),
                           "fencing.timeout", "unknown key (allowed: command, timeout_ms, "
                           "required)")

    def test_wrong_types(self) -> None:
        self.assertProblem(lambda r: r.update(fencing={"command": "fence node"}),
                           "fencing.command", "must be an array, not a string")
        self.assertProblem(lambda r: r.update(fencing={"command": ["fence", 3]}),
                           "fencing.command", "array of non-empty strings")
        self.assertProblem(lambda r: r.update(fencing={"command": ["fence", ""]}),
                           "fencing.command", "array of non-empty strings")
        self.assertProblem(lambda r: r.update(fencing={"command": ["f"], "required": "yes"}),
                           "fencing.required", "must be a boolean, not a string")
        self.assertProblem(lambda r: r.update(fencing={"command": ["f"], "required": 1}),
                           "fencing.required", "must be a boolean, not an integer")
        self.assertProblem(lambda r: r.update(fencing={"command": ["f"], "timeout_ms": 2.5}),
                           "fencing.timeout_ms", "must be an integer, not a number")
        self.assertProblem(lambda r: r.update(fencing={"command": ["f"], "timeout_ms": 0}),
                           "fencing.timeout_ms", "must be 10-600000")
        self.assertProblem(lambda r: r.update(fencing=["f"]), "fencing",
                           "must be a table, not an array")

    def test_missing_command(self) -> None:
        self.assertProblem(lambda r: r.update(fencing={"required": False}),
                           "fencing.command", "missing")
        self.assertProblem(lambda r: r.update(fencing={"command": []}),
                           "fencing.command", "must not be empty")

    def test_every_problem_of_the_section_is_collected(self) -> None:
        problems = self.problems(lambda r: r.update(
            fencing={"command": "x", "timeout_ms": -1, "required": "no", "retry": 1}))
        self.assertEqual(len([p for p in problems if ": fencing." in p]), 4, problems)


class TakeoverConfigTests(SynchronousTestCase):
    """The optional ``[takeover]`` section (recovery batches)."""

    problems = ValidationTests.problems
    assertProblem = ValidationTests.assertProblem

    def test_defaults(self) -> None:
        config = parse_config(demo_raw(), DEMO)
        self.assertEqual(config.takeover, TakeoverConfig(100, 10.0))
        self.assertEqual(TakeoverTimeouts.from_config(config, config.nodes[0]).recover, 10.0)

    def test_values_and_not_in_the_digest(self) -> None:
        raw = demo_raw()
        raw["takeover"] = {"recover_batch": 25, "recover_timeout_ms": 4000}
        config = parse_config(raw, DEMO)
        self.assertEqual(config.takeover, TakeoverConfig(25, 4.0))
        self.assertEqual(TakeoverTimeouts.from_config(config, config.nodes[0]).recover, 4.0)
        self.assertEqual(config.digest, parse_config(demo_raw(), DEMO).digest)

    def test_problems(self) -> None:
        self.assertProblem(lambda r: r.update(takeover={"recover_batch": 0}),
                           "takeover.recover_batch", "must be 1-10000")
        self.assertProblem(lambda r: r.update(takeover={"recover_batch": "50"}),
                           "takeover.recover_batch", "must be an integer, not a string")
        self.assertProblem(lambda r: r.update(takeover={"recover_timeout_ms": 50}),
                           "takeover.recover_timeout_ms", "must be 100-600000")
        self.assertProblem(lambda r: r.update(takeover={"batch": 5}),
                           "takeover.batch", "unknown key (allowed: recover_batch, "
                           "recover_timeout_ms, profiles)")
        self.assertProblem(lambda r: r.update(takeover={"profiles": "hot"}),
                           "takeover.profiles", "must be one of classic, hot_standby")

    def test_hot_standby_profiles(self) -> None:
        self.assertEqual(parse_config(demo_raw(), DEMO).takeover.profiles, "classic")
        self.assertFalse(parse_config(demo_raw(), DEMO).takeover.hot_standby)
        raw = demo_raw()
        raw["takeover"] = {"profiles": "hot_standby"}
        raw["floating_ip"]["backend"] = "ip"
        config = parse_config(raw, DEMO)
        self.assertTrue(config.takeover.hot_standby)
        self.assertEqual(config.digest, parse_config(demo_raw(), DEMO).digest)

    def test_hot_standby_refused_with_the_loopback_backend(self) -> None:
        problems = self.problems(lambda r: r.update(takeover={"profiles": "hot_standby"}))
        self.assertEqual(len(problems), 1, problems)
        self.assertTrue(problems[0].startswith(f"{DEMO}: takeover.profiles: \"hot_standby\" "
                                               "needs [floating_ip] backend"), problems)

    def test_check_config_exits_2_with_one_line(self) -> None:
        from fsha.cli.check_config import main

        raw = DEMO.read_text() + '\n[takeover]\nprofiles = "hot_standby"\n'
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(raw.replace('secret_file = "', f'secret_file = "{DEMO.parent}/'))
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main([str(path)]), 2)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"{path}: takeover.profiles: "), lines)

    def test_nonlocal_bind_and_nft_checked_at_start_up(self) -> None:
        from fsha.startup import StartupError, check_hot_standby

        raw = demo_raw()
        raw["takeover"] = {"profiles": "hot_standby"}
        raw["floating_ip"]["backend"] = "ip"
        config = parse_config(raw, DEMO)
        proc = Path(self.mktemp())
        (proc / "ipv4").mkdir(parents=True)
        (proc / "ipv4" / "ip_nonlocal_bind").write_text("0\n")
        nft = lambda tool: f"/usr/sbin/{tool}"  # noqa: E731
        with self.assertRaises(StartupError) as caught:
            check_hot_standby(config, proc, nft)
        self.assertEqual(str(caught.exception),
                         f"{DEMO}: takeover.profiles: \"hot_standby\" needs "
                         "net.ipv4.ip_nonlocal_bind=1 on this host (it is 0): "
                         "sysctl -w net.ipv4.ip_nonlocal_bind=1")
        (proc / "ipv4" / "ip_nonlocal_bind").write_text("1\n")
        check_hot_standby(config, proc, nft)  # fine now
        with self.assertRaises(StartupError) as caught:
            check_hot_standby(config, proc, lambda tool: None)
        self.assertIn("needs nft (nftables)", str(caught.exception))
        # classic: nothing read
        check_hot_standby(parse_config(demo_raw(), DEMO), proc / "none", lambda tool: None)


class HungAfterTests(SynchronousTestCase):
    """``[[node]] esl.hung_after_ms``: how long without any answer means hung."""

    problems = ValidationTests.problems
    assertProblem = ValidationTests.assertProblem

    def test_default_and_value(self) -> None:
        config = parse_config(demo_raw(), DEMO)
        self.assertEqual(config.nodes[0].esl.hung_after, 5.0)
        raw = demo_raw()
        raw["node"][0]["esl"]["hung_after_ms"] = 8000
        self.assertEqual(parse_config(raw, DEMO).nodes[0].esl.hung_after, 8.0)
        raw["node"][0]["esl"].pop("hung_after_ms")
        raw["node"][0]["esl"]["timeout_ms"] = 4000
        self.assertEqual(parse_config(raw, DEMO).nodes[0].esl.hung_after, 8.0)

    def test_must_be_longer_than_the_timeout(self) -> None:
        def bad(r: dict[str, Any]) -> None:
            r["node"][0]["esl"].update(timeout_ms=2000, hung_after_ms=2000)
        name = demo_raw()["node"][0]["name"]
        self.assertProblem(bad, f"node.{name}.esl.hung_after_ms", "must be longer than")


TLS = {"ca": "pki/ca.crt", "cert": "pki/{node}.crt", "key": "pki/{node}.key"}


class LimitsRedisConfigTests(SynchronousTestCase):
    """The optional ``[limits]`` and ``[redis]`` sections."""

    problems = ValidationTests.problems
    assertProblem = ValidationTests.assertProblem

    def test_absent_by_default(self) -> None:
        config = parse_config(demo_raw(), DEMO)
        self.assertIsNone(config.limits)
        self.assertIsNone(config.redis)

    def test_defaults(self) -> None:
        raw = demo_raw()
        raw["tls"] = TLS
        raw["limits"] = {}
        raw["redis"] = {"address": "127.0.0.1:6379"}
        config = parse_config(raw, DEMO)
        self.assertEqual(config.limits, LimitsConfig(2.0, "fsha_limit", (), 10.0, 10.0, 5.0))
        redis = config.redis
        assert redis is not None
        self.assertEqual((redis.host, redis.port, redis.db, redis.tls, redis.timeout,
                          redis.reconnect_min, redis.reconnect_max, redis.key_prefix,
                          redis.marker_ttl), ("127.0.0.1", 6379, 0, False, 1.0, 0.5, 10.0,
                                              "fsha:", 7 * 86400))
        self.assertIsNone(redis.password_file)
        self.assertEqual((redis.durable_state, redis.durable_flush), (False, 0.2))
        no_limits = demo_raw()
        no_limits["tls"] = TLS
        self.assertEqual(config.digest, parse_config(no_limits, DEMO).digest)

    def test_full(self) -> None:
        raw = demo_raw()
        raw["tls"] = TLS
        raw["limits"] = {"poll_interval_ms": 500, "hash_realm": "", "hiredis_realms":
                         ["default", "trunks"], "sweep_interval_ms": 1000,
                         "reconcile_timeout_ms": 3000, "retry_interval_ms": 700}
        raw["redis"] = {"address": "redis.example.net:6380", "db": 2, "username": "fsha",
                        "password_file": "redis.pw", "tls": True, "ca": "pki/redis-ca.crt",
                        "server_name": "redis", "timeout_ms": 250, "connect_timeout_ms": 900,
                        "reconnect_min_ms": 100, "reconnect_max_ms": 100,
                        "key_prefix": "c1:", "marker_ttl_s": 3600, "durable_state": True,
                        "durable_flush_ms": 500}
        config = parse_config(raw, DEMO)
        self.assertEqual(config.limits, LimitsConfig(0.5, None, ("default", "trunks"), 1.0,
                                                     3.0, 0.7))
        redis = config.redis
        assert redis is not None
        self.assertEqual((redis.host, redis.port, redis.db, redis.username), (
            "redis.example.net", 6380, 2, "fsha"))
        self.assertEqual(redis.password_file, DEMO.parent / "redis.pw")
        self.assertEqual(redis.ca, DEMO.parent / "pki" / "redis-ca.crt")
        self.assertEqual((redis.tls, redis.server_name, redis.timeout, redis.connect_timeout,
                          redis.key_prefix, redis.marker_ttl),
                         (True, "redis", 0.25, 0.9, "c1:", 3600))
        self.assertEqual((redis.durable_state, redis.durable_flush), (True, 0.5))

    def test_problems(self) -> None:
        red = {"address": "127.0.0.1:6379"}
        self.assertProblem(lambda r: r.update(limits={}), "limits", "needs [tls]")
        self.assertProblem(lambda r: r.update(limits={"poll": 1}), "limits.poll",
                           "unknown key")
        self.assertProblem(lambda r: r.update(limits={"poll_interval_ms": "1s"}),
                           "limits.poll_interval_ms", "must be an integer, not a string")
        self.assertProblem(lambda r: r.update(limits={"poll_interval_ms": 10}),
                           "limits.poll_interval_ms", "must be 50-600000")
        self.assertProblem(lambda r: r.update(limits={"hash_realm": "a/b"}),
                           "limits.hash_realm", "must not contain")
        self.assertProblem(lambda r: r.update(limits={"hiredis_realms": "default"}),
                           "limits.hiredis_realms", "must be an array, not a string")
        self.assertProblem(lambda r: r.update(limits={"hiredis_realms": ["a b"]}, redis=red),
                           "limits.hiredis_realms", "non-empty strings")
        self.assertProblem(lambda r: r.update(limits={"hiredis_realms": ["default"]}),
                           "limits.hiredis_realms", "needs a [redis] section")
        self.assertProblem(lambda r: r.update(limits=3), "limits", "must be a table")
        self.assertProblem(lambda r: r.update(redis={}), "redis.address", "missing")
        self.assertProblem(lambda r: r.update(redis={"address": "localhost"}),
                           "redis.address", "must be HOST:PORT")
        self.assertProblem(lambda r: r.update(redis={"address": "h:70000"}),
                           "redis.address", "must be HOST:PORT")
        self.assertProblem(lambda r: r.update(redis={**red, "tls": True}), "redis.ca",
                           "missing: tls = true")
        self.assertProblem(lambda r: r.update(redis={**red, "tls": "yes"}), "redis.tls",
                           "must be a boolean")
        self.assertProblem(lambda r: r.update(redis={**red, "timeout_ms": 0}),
                           "redis.timeout_ms", "must be 10-60000")
        self.assertProblem(lambda r: r.update(redis={**red, "reconnect_min_ms": 500,
                                                     "reconnect_max_ms": 100}),
                           "redis.reconnect_max_ms", "less than reconnect_min_ms")
        self.assertProblem(lambda r: r.update(redis={**red, "password": "x"}),
                           "redis.password", "unknown key")
        self.assertProblem(lambda r: r.update(redis={**red, "marker_ttl_s": 1}),
                           "redis.marker_ttl_s", "must be 60-31622400")
        self.assertProblem(lambda r: r.update(redis={**red, "db": -1}), "redis.db",
                           "must be >= 0")
        self.assertProblem(lambda r: r.update(redis={**red, "durable_state": 1}),
                           "redis.durable_state", "must be a boolean")
        self.assertProblem(lambda r: r.update(redis={**red, "durable_state": True}),
                           "redis.durable_state", "needs [tls]")
        self.assertProblem(lambda r: r.update(redis={**red, "durable_flush_ms": 5}),
                           "redis.durable_flush_ms", "must be 10-60000")

    def test_password_file(self) -> None:
        base = Path(self.mktemp())
        base.mkdir()
        raw = demo_raw()
        raw["redis"] = {"address": "127.0.0.1:6379", "password_file": "pw"}
        path = base / "cluster.toml"
        config = parse_config(raw, path)
        with self.assertRaises(ConfigError) as caught:
            read_redis_password(config)
        self.assertIn(f"{path}: redis.password_file: cannot read", str(caught.exception))
        (base / "pw").write_text("\n")
        with self.assertRaises(ConfigError) as caught:
            read_redis_password(config)
        self.assertIn("is empty", str(caught.exception))
        (base / "pw").write_text("top-secret\n")
        self.assertEqual(read_redis_password(config), "top-secret")
        raw["redis"] = {"address": "127.0.0.1:6379", "tls": True, "ca": "nope.crt"}
        with self.assertRaises(ConfigError) as caught:
            read_redis_password(parse_config(raw, path))
        self.assertIn("redis.ca:", str(caught.exception))
        self.assertIsNone(read_redis_password(parse_config(demo_raw(), path)))


class AdaptiveDetectorConfigTests(SynchronousTestCase):
    """cluster.dead_after_min_ms: the adaptive detector's floor (fsha.detector)."""

    def parse(self, **cluster: Any) -> Any:
        raw = copy.deepcopy(demo_raw())
        raw["cluster"].update(cluster)
        return parse_config(raw, DEMO)

    def test_absent_is_a_fixed_dead_after(self) -> None:
        config = self.parse(heartbeat_interval_ms=20, dead_after_ms=100)
        self.assertIsNone(config.dead_after_min)
        self.assertEqual(config.detection_floor, 0.1)
        self.assertEqual(config.guard.lease if config.guard else 0.1, 0.1)

    def test_floor_and_ceiling(self) -> None:
        config = self.parse(heartbeat_interval_ms=5, dead_after_min_ms=25, dead_after_ms=100)
        self.assertEqual((config.detection_floor, config.dead_after), (0.025, 0.1))
        fixed = self.parse(heartbeat_interval_ms=5, dead_after_ms=100)
        self.assertNotEqual(config.digest, fixed.digest)

    def test_out_of_range(self) -> None:
        for floor in (9, 101):
            with self.assertRaises(ConfigError) as caught:
                self.parse(heartbeat_interval_ms=5, dead_after_min_ms=floor, dead_after_ms=100)
            (line,) = caught.exception.problems
            self.assertIn("cluster.dead_after_min_ms", line)
            self.assertIn("at least two heartbeat intervals (10 ms) and at most "
                          "dead_after_ms (100 ms)", line)

    def test_the_guard_drops_by_the_floor(self) -> None:
        raw = copy.deepcopy(demo_raw())
        raw["cluster"].update(heartbeat_interval_ms=5, dead_after_min_ms=25,
                              dead_after_ms=100)
        raw["guard"] = {"enabled": True}
        self.assertEqual(parse_config(raw, DEMO).guard.lease, 0.025)  # type: ignore[union-attr]
        raw["guard"] = {"lease_ms": 50}
        with self.assertRaises(ConfigError) as caught:
            parse_config(raw, DEMO)
        self.assertIn("at most the shortest silence the peers judge death (25 ms: "
                      "cluster.dead_after_min_ms)", caught.exception.problems[0])

    def test_the_stall_warning_is_about_the_floor(self) -> None:
        from fsha.config import timing_warnings

        (line,) = timing_warnings(self.parse(heartbeat_interval_ms=5, dead_after_min_ms=25,
                                             dead_after_ms=100))
        self.assertIn("cluster.dead_after_min_ms: 25 ms is only 20 ms more", line)
        self.assertEqual(timing_warnings(self.parse(
            heartbeat_interval_ms=10, dead_after_min_ms=50, dead_after_ms=100)), [])
