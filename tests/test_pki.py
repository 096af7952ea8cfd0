"""Tests for fsha.pki: the cluster CA, node certificates and ``fsha certs``."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from fsha import pki
from fsha.config import load_config

CONFIG = """
[cluster]
name = "{cluster}"
secret_file = "secret"

[tls]
ca = "pki/ca.crt"
cert = "pki/{{node}}.crt"
key = "pki/{{node}}.key"

[[network]]
name = "a"
port = 7000

[[network]]
name = "b"
port = 7001

[[node]]
name = "alpha"
address = {{ a = "127.0.1.1", b = "127.0.2.1" }}
stream = "127.0.1.1:7100"
status = "127.0.1.1:7200"
esl = {{ password = "ClueCon" }}

[[node]]
name = "beta"
address = {{ a = "127.0.1.2", b = "127.0.2.2" }}
stream = "127.0.3.2:7100"
status = "127.0.1.2:7200"
esl = {{ password = "ClueCon" }}

[[slot]]
name = "s1"
profiles = ["internal"]
ip = [{{ address = "127.0.9.1/32", interface = "lo" }}]
"""


def write_config(directory: Path, cluster: str = "prod") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cluster.toml"
    path.write_text(CONFIG.format(cluster=cluster))
    (directory / "secret").write_bytes(b"0123456789abcdef0123")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pki.main(argv)
    return code, out.getvalue(), err.getvalue()


class CATests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())

    def test_create_ca(self) -> None:
        cert_path, key_path = pki.create_ca(self.dir, "prod")
        self.assertEqual((cert_path, key_path), (self.dir / "ca.crt", self.dir / "ca.key"))
        self.assertEqual(mode(key_path), 0o600)
        cert = pki.load_certificate(cert_path)
        key = pki.load_private_key(key_path)
        self.assertEqual(cert.public_key(), key.public_key())
        self.assertEqual(pki.cert_cluster(cert), "prod")
        self.assertEqual(cert.subject, cert.issuer)
        cert.verify_directly_issued_by(cert)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertTrue(bc.ca)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertEqual(sorted(p.name for p in self.dir.iterdir()), ["ca.crt", "ca.key"])

    def test_key_mode_independent_of_umask(self) -> None:
        old = os.umask(0)
        try:
            _, key_path = pki.create_ca(self.dir, "prod")
        finally:
            os.umask(old)
        self.assertEqual(mode(key_path), 0o600)

    def test_refuses_to_overwrite(self) -> None:
        pki.create_ca(self.dir, "prod")
        before = (self.dir / "ca.key").read_bytes()
        with self.assertRaises(pki.PKIError) as ctx:
            pki.create_ca(self.dir, "prod")
        self.assertIn(str(self.dir / "ca.crt"), str(ctx.exception))
        self.assertEqual((self.dir / "ca.key").read_bytes(), before)

    def test_validity(self) -> None:
        now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
        cert_path, _ = pki.create_ca(self.dir, "prod", days=10, now=now)
        info = pki.cert_info(pki.load_certificate(cert_path))
        self.assertEqual(info.not_after, now + datetime.timedelta(days=10))
        self.assertLess(info.not_before, now)
        self.assertTrue(info.is_ca)

    def test_bad_cluster_name(self) -> None:
        self.assertRaises(pki.PKIError, pki.create_ca, self.dir, " ")
        self.assertRaises(pki.PKIError, pki.create_ca, self.dir, "x" * 65)


class IssueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.config = load_config(write_config(self.dir))
        pki.create_ca(self.dir / "pki", "prod")

    def test_issue(self) -> None:
        cert_path, key_path = pki.issue_node_cert(self.config, "beta")
        self.assertEqual(cert_path, self.dir / "pki" / "beta.crt")
        self.assertEqual(mode(key_path), 0o600)
        cert = pki.load_certificate(cert_path)
        ca = pki.load_certificate(self.dir / "pki" / "ca.crt")
        cert.verify_directly_issued_by(ca)
        self.assertEqual(cert.public_key(), pki.load_private_key(key_path).public_key())
        info = pki.cert_info(cert)
        self.assertEqual(info.dns_names, ("beta",))
        # network addresses, then the stream host (a different IP here)
        self.assertEqual(info.ip_addresses, ("127.0.1.2", "127.0.2.2", "127.0.3.2"))
        self.assertEqual(info.cluster, "prod")
        self.assertEqual(info.common_name, "beta")
        self.assertFalse(info.is_ca)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, eku)
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, eku)

    def test_stream_host_not_duplicated(self) -> None:
        cert_path, _ = pki.issue_node_cert(self.config, "alpha")
        info = pki.cert_info(pki.load_certificate(cert_path))
        self.assertEqual(info.ip_addresses, ("127.0.1.1", "127.0.2.1"))

    def test_validity_capped_by_ca(self) -> None:
        cert_path, _ = pki.issue_node_cert(self.config, "alpha", days=100_000)
        ca = pki.load_certificate(self.dir / "pki" / "ca.crt")
        self.assertEqual(pki.load_certificate(cert_path).not_valid_after_utc,
                         ca.not_valid_after_utc)

    def test_unknown_node(self) -> None:
        with self.assertRaises(pki.PKIError) as ctx:
            pki.issue_node_cert(self.config, "gamma")
        self.assertIn("gamma", str(ctx.exception))
        self.assertIn("alpha, beta", str(ctx.exception))

    def test_ca_of_another_cluster(self) -> None:
        other = Path(self.mktemp())
        cert, key = pki.create_ca(other, "staging")
        with self.assertRaises(pki.PKIError) as ctx:
            pki.issue_node_cert(self.config, "alpha", ca_key=key)
        self.assertIn("ca.key", str(ctx.exception))  # key does not match the config's CA
        os.replace(cert, self.dir / "pki" / "ca.crt")
        os.replace(key, self.dir / "pki" / "ca.key")
        with self.assertRaises(pki.PKIError) as ctx:
            pki.issue_node_cert(self.config, "alpha")
        self.assertIn("'staging'", str(ctx.exception))
        self.assertFalse((self.dir / "pki" / "alpha.key").exists())

    def test_overwrite_needs_force(self) -> None:
        cert_path, _ = pki.issue_node_cert(self.config, "alpha")
        first = cert_path.read_bytes()
        self.assertRaises(pki.PKIError, pki.issue_node_cert, self.config, "alpha")
        self.assertEqual(cert_path.read_bytes(), first)
        pki.issue_node_cert(self.config, "alpha", overwrite=True)
        self.assertNotEqual(cert_path.read_bytes(), first)
        leftovers = [p.name for p in (self.dir / "pki").iterdir() if p.name.startswith(".")]
        self.assertEqual(leftovers, [])

    def test_missing_ca(self) -> None:
        (self.dir / "pki" / "ca.key").unlink()
        with self.assertRaises(pki.PKIError) as ctx:
            pki.issue_node_cert(self.config, "alpha")
        self.assertTrue(str(ctx.exception).startswith(str(self.dir / "pki" / "ca.key")))

    def test_corrupt_files(self) -> None:
        bad = self.dir / "bad.pem"
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
        self.assertRaises(pki.PKIError, pki.load_certificate, bad)
        self.assertRaises(pki.PKIError, pki.load_private_key, bad)

    def test_dns_unsafe_name(self) -> None:
        self.assertRaises(pki.PKIError, pki.issue_cert, self.dir / "pki" / "ca.crt",
                          self.dir / "pki" / "ca.key", "prod", "bad name", [],
                          self.dir / "x.crt", self.dir / "x.key")


class EnsureTests(SynchronousTestCase):
    def test_ensure_creates_and_keeps(self) -> None:
        directory = Path(self.mktemp())
        config = load_config(write_config(directory))
        result = pki.ensure_cluster_pki(config)
        self.assertEqual(set(result.nodes), {"alpha", "beta"})
        ca = pki.load_certificate(result.ca_cert)
        prints = {}
        for name, (cert_path, key_path) in result.nodes.items():
            cert = pki.load_certificate(cert_path)
            cert.verify_directly_issued_by(ca)
            self.assertEqual(mode(key_path), 0o600)
            prints[name] = pki.cert_info(cert).fingerprint
        again = pki.ensure_cluster_pki(config)
        for name, (cert_path, _) in again.nodes.items():
            self.assertEqual(pki.cert_info(pki.load_certificate(cert_path)).fingerprint,
                             prints[name])
        result.nodes["beta"][0].unlink()
        third = pki.ensure_cluster_pki(config)
        self.assertEqual(pki.cert_info(pki.load_certificate(third.nodes["alpha"][0])).fingerprint,
                         prints["alpha"])
        self.assertNotEqual(
            pki.cert_info(pki.load_certificate(third.nodes["beta"][0])).fingerprint,
            prints["beta"])

    def test_ensure_reissues_for_new_ca(self) -> None:
        directory = Path(self.mktemp())
        config = load_config(write_config(directory))
        first = pki.ensure_cluster_pki(config)
        old = pki.cert_info(pki.load_certificate(first.nodes["alpha"][0])).fingerprint
        first.ca_cert.unlink()
        second = pki.ensure_cluster_pki(config)
        cert = pki.load_certificate(second.nodes["alpha"][0])
        self.assertNotEqual(pki.cert_info(cert).fingerprint, old)
        cert.verify_directly_issued_by(pki.load_certificate(second.ca_cert))

    def test_ensure_without_tls(self) -> None:
        directory = Path(self.mktemp())
        path = write_config(directory)
        text = path.read_text()
        start = text.index("[tls]")
        path.write_text(text[:start] + text[text.index("[[network]]"):])
        with self.assertRaises(pki.PKIError) as ctx:
            pki.ensure_cluster_pki(load_config(path))
        self.assertIn("tls", str(ctx.exception))


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.config = write_config(self.dir)

    def test_full_cycle(self) -> None:
        code, out, err = run(["init", str(self.dir / "pki"), "--config", str(self.config)])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("'prod'", out)
        code, out, err = run(["issue", "alpha", "--config", str(self.config), "--days", "30"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("DNS:alpha, IP:127.0.1.1, IP:127.0.2.1", out)
        code, out, err = run(["show", str(self.dir / "pki" / "alpha.crt")])
        self.assertEqual(code, 0)
        self.assertIn("O=prod", out)
        self.assertIn("SHA256 ", out)
        self.assertIn("(valid, 29 days left)", out)
        # beta is missing: show --config says so and fails
        code, out, err = run(["show", "--config", str(self.config)])
        self.assertEqual(code, 2)
        self.assertIn(str(self.dir / "pki" / "beta.crt"), out)
        run(["issue", "beta", "--config", str(self.config)])
        code, out, err = run(["show", "--config", str(self.config)])
        self.assertEqual(code, 0, out)
        self.assertEqual(out.count("check:       OK"), 2)

    def test_errors_are_one_line_naming_the_file(self) -> None:
        code, _, err = run(["issue", "alpha", "--config", str(self.config)])
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1)
        self.assertTrue(err.startswith(str(self.dir / "pki" / "ca.crt")), err)
        run(["init", str(self.dir / "pki"), "--cluster", "prod"])
        code, _, err = run(["init", str(self.dir / "pki"), "--cluster", "prod"])
        self.assertEqual(code, 2)
        self.assertEqual(err, f"{self.dir / 'pki' / 'ca.crt'}: already exists; "
                              "refusing to overwrite it\n")
        code, _, err = run(["show", str(self.dir / "nope.crt")])
        self.assertEqual((code, err.count("\n")), (2, 1))
        self.assertIn("nope.crt", err)
        code, _, err = run(["issue", "alpha", "--config", str(self.dir / "missing.toml")])
        self.assertEqual(code, 2)
        self.assertIn("missing.toml", err)

    def test_cluster_mismatch(self) -> None:
        code, _, err = run(["init", str(self.dir / "pki"), "--cluster", "other",
                            "--config", str(self.config)])
        self.assertEqual(code, 2)
        self.assertIn("'other'", err)
        self.assertFalse((self.dir / "pki").exists())

    def test_wrong_cluster_ca_detected_by_show(self) -> None:
        run(["init", str(self.dir / "pki"), "--cluster", "prod"])
        run(["issue", "alpha", "--config", str(self.config)])
        run(["issue", "beta", "--config", str(self.config)])
        other = Path(self.mktemp())
        cert, _key = pki.create_ca(other, "prod")
        os.replace(cert, self.dir / "pki" / "ca.crt")
        code, out, _ = run(["show", "--config", str(self.config)])
        self.assertEqual(code, 2)
        self.assertIn("not signed by the cluster CA", out)
