"""The cluster PKI: one CA per cluster, one key + certificate per node.

``fsha certs init DIR [--cluster NAME]`` creates the cluster CA (``DIR/ca.crt`` and
``DIR/ca.key``); ``fsha certs issue NAME --config FILE`` issues a node's key and certificate,
signed by the CA the config's ``[tls]`` section names; ``fsha certs show`` prints what a
certificate says. The replication links (``fsha.replication.link``) use these files.

Identity rules, shared by the issuer and the link verifier:

- every certificate's subject carries the cluster name as its organizationName (O), so a
  certificate of another cluster is told apart even if someone reused a CA key;
- a node certificate's commonName (CN) is the node name, and its subjectAltNames are
  ``DNS:<node name>`` plus every IP the config gives that node (its network addresses and
  its stream host, unspecified addresses left out);
- the CA key is the CA certificate's path with the suffix ``.key`` (``pki/ca.crt`` ->
  ``pki/ca.key``).

Keys are ECDSA P-256 (fast TLS handshakes), written PEM/PKCS#8 unencrypted with mode 0600 at
creation (``os.open``), and every file is written to a temporary name and renamed, so a
crash never leaves half a key behind. This module does no network I/O.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fsha.config import ClusterConfig, ConfigError, NodeConfig, TLSConfig, load_config

__all__ = [
    "CA_COMMON_NAME",
    "CA_DAYS",
    "NODE_DAYS",
    "CertInfo",
    "ClusterPKI",
    "PKIError",
    "ca_key_path",
    "cert_cluster",
    "cert_common_name",
    "cert_info",
    "create_ca",
    "ensure_cluster_pki",
    "issue_node_cert",
    "load_certificate",
    "load_private_key",
    "main",
    "node_ips",
    "write_ca",
]

CA_COMMON_NAME: Final = "fsha cluster CA"
CA_DAYS: Final = 3650
NODE_DAYS: Final = 825
#: Backdating of notBefore, so a peer whose clock is a little behind accepts a fresh cert.
_BACKDATE: Final = datetime.timedelta(hours=1)
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
# What may appear in a DNS subjectAltName: letters, digits, hyphens and dots (RFC 1123).
_DNS_NAME: Final = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                              r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class PKIError(Exception):
    """A PKI file that cannot be used or written; the message names the file."""


@dataclass(frozen=True, slots=True)
class ClusterPKI:
    """Where :func:`ensure_cluster_pki` left the cluster's files."""

    ca_cert: Path
    ca_key: Path
    nodes: dict[str, tuple[Path, Path]]  # node name -> (cert, key)


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What ``fsha certs show`` prints about one certificate."""

    subject: str
    issuer: str
    cluster: str | None
    common_name: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: datetime.datetime
    not_after: datetime.datetime
    is_ca: bool
    serial: int
    fingerprint: str  # SHA-256, colon-separated upper-case hex


def _now(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def ca_key_path(ca_cert: Path) -> Path:
    """The CA key that goes with ``ca_cert``: same path, suffix ``.key``."""
    return ca_cert.with_suffix(".key")


# -- files ----------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` created with ``mode``, atomically (temp file + rename)."""
    if not overwrite and path.exists():
        raise PKIError(f"{path}: already exists; refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise PKIError(f"{path}: cannot create: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name appeared meanwhile: never clobber a key we did not write
            os.link(tmp, path)
    except OSError as e:
        raise PKIError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise PKIError(f"{path}: cannot read: {e.strerror or e}") from None


def load_certificate(path: Path) -> x509.Certificate:
    """The PEM certificate in ``path``; raises PKIError naming the file."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PKIError(f"{path}: not a PEM certificate") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The PEM (unencrypted) EC private key in ``path``; raises PKIError naming the file."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PKIError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: not an EC private key")
    return key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- names ----------------------------------------------------------------------------------


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str | None:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


def cert_cluster(cert: x509.Certificate) -> str | None:
    """The cluster name in the certificate's subject (O), or None."""
    return _attr(cert.subject, NameOID.ORGANIZATION_NAME)


def cert_common_name(cert: x509.Certificate) -> str | None:
    """The subject's commonName (CN): the node name of a node certificate."""
    return _attr(cert.subject, NameOID.COMMON_NAME)


def _check_cluster_name(cluster: str) -> None:
    if not cluster or not cluster.strip():
        raise PKIError("cluster name must not be empty")
    if len(cluster.encode("utf-8")) > 64:  # ub-organization-name (RFC 5280)
        raise PKIError(f"cluster name {cluster!r} is longer than 64 bytes")


def node_ips(node: NodeConfig) -> list[str]:
    """Every IP of ``node`` in the config, in order, without duplicates or wildcards."""
    result: list[str] = []
    for ip in [*node.addresses.values(), node.stream.host]:
        addr = ipaddress.ip_address(ip)
        if addr.is_unspecified:
            continue
        text = str(addr)
        if text not in result:
            result.append(text)
    return result


# -- issuing --------------------------------------------------------------------------------


def write_ca(cert_path: Path, key_path: Path, cluster: str, *, days: int = CA_DAYS,
             now: datetime.datetime | None = None, overwrite: bool = False) -> None:
    """Create a cluster CA: a new key and a self-signed certificate naming ``cluster``."""
    _check_cluster_name(cluster)
    if days < 1:
        raise PKIError(f"--days {days}: must be at least 1")
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
        x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        if not overwrite and path.exists():
            raise PKIError(f"{path}: already exists; refusing to overwrite it")
    _write_file(key_path, _key_pem(key), _KEY_MODE, overwrite=overwrite)
    _write_file(cert_path, _cert_pem(cert), _CERT_MODE, overwrite=overwrite)


def create_ca(directory: Path, cluster: str, *, days: int = CA_DAYS,
              now: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Create ``directory/ca.crt`` and ``directory/ca.key``; returns (cert, key) paths."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise PKIError(f"{directory}: cannot create directory: {e.strerror or e}") from None
    cert_path = directory / "ca.crt"
    write_ca(cert_path, ca_key_path(cert_path), cluster, days=days, now=now)
    return cert_path, ca_key_path(cert_path)


def _load_ca(ca_cert_path: Path, ca_key_path_: Path, cluster: str
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert = load_certificate(ca_cert_path)
    ca_key = load_private_key(ca_key_path_)
    if ca_cert.public_key() != ca_key.public_key():
        raise PKIError(f"{ca_key_path_}: is not the key of the CA certificate {ca_cert_path}")
    found = cert_cluster(ca_cert)
    if found != cluster:
        raise PKIError(f"{ca_cert_path}: is the CA of cluster {found!r}, "
                       f"the config is cluster {cluster!r}")
    return ca_cert, ca_key


def issue_cert(ca_cert_path: Path, ca_key_path_: Path, cluster: str, node: str,
               ips: Iterable[str], cert_path: Path, key_path: Path, *, days: int = NODE_DAYS,
               now: datetime.datetime | None = None, overwrite: bool = False) -> None:
    """Issue a node key + certificate (CN=node, O=cluster, SAN DNS:node + ``ips``)."""
    if not _DNS_NAME.match(node):
        raise PKIError(f"node name {node!r} cannot be a DNS subjectAltName "
                       "(letters, digits, '-' and '.' only)")
    if days < 1:
        raise PKIError(f"--days {days}: must be at least 1")
    ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path_, cluster)
    start = _now(now)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(node)]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, node),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    for path in (cert_path, key_path):
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise PKIError(f"{path.parent}: cannot create directory: {e.strerror or e}") from None
        if not overwrite and path.exists():
            raise PKIError(f"{path}: already exists; refusing to overwrite it (use --force)")
    _write_file(key_path, _key_pem(key), _KEY_MODE, overwrite=overwrite)
    _write_file(cert_path, _cert_pem(cert), _CERT_MODE, overwrite=overwrite)


def _tls(config: ClusterConfig) -> TLSConfig:
    if config.tls is None:
        raise PKIError(f"{config.path}: tls: missing: add a [tls] section (ca, cert, key)")
    return config.tls


def issue_node_cert(config: ClusterConfig, node: str, *, days: int = NODE_DAYS,
                    now: datetime.datetime | None = None, overwrite: bool = False,
                    ca_key: Path | None = None) -> tuple[Path, Path]:
    """Issue ``node``'s key + certificate to the config's [tls] paths; returns (cert, key)."""
    tls = _tls(config)
    try:
        node_config = config.node(node)
    except KeyError:
        known = ", ".join(n.name for n in config.nodes)
        raise PKIError(f"{config.path}: no node named {node!r} (configured: {known})") from None
    cert_path, key_path = tls.cert_for(node), tls.key_for(node)
    issue_cert(tls.ca, ca_key or ca_key_path(tls.ca), config.name, node, node_ips(node_config),
               cert_path, key_path, days=days, now=now, overwrite=overwrite)
    return cert_path, key_path


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def ensure_cluster_pki(config: ClusterConfig, *, days: int = NODE_DAYS) -> ClusterPKI:
    """A throwaway PKI for ``config`` (demo, tests): creates what is missing or stale.

    Creates the CA named by the config's [tls] section if it does not exist, then issues
    every node's key + certificate that is missing, not signed by that CA, or whose
    subjectAltNames no longer match the config.
    """
    tls = _tls(config)
    ca_key = ca_key_path(tls.ca)
    if not tls.ca.exists():
        try:
            tls.ca.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise PKIError(f"{tls.ca.parent}: cannot create directory: {e.strerror or e}") \
                from None
        write_ca(tls.ca, ca_key, config.name, overwrite=True)
    ca = load_certificate(tls.ca)
    nodes: dict[str, tuple[Path, Path]] = {}
    for node in config.nodes:
        cert_path, key_path = tls.cert_for(node.name), tls.key_for(node.name)
        if cert_path.exists() and key_path.exists():
            try:
                info = cert_info(load_certificate(cert_path))
                current = (_signed_by(load_certificate(cert_path), ca)
                           and info.dns_names == (node.name,)
                           and info.ip_addresses == tuple(node_ips(node))
                           and info.cluster == config.name
                           and info.not_after > datetime.datetime.now(datetime.UTC))
            except PKIError:
                current = False
            if current:
                nodes[node.name] = (cert_path, key_path)
                continue
        nodes[node.name] = issue_node_cert(config, node.name, days=days, overwrite=True)
    return ClusterPKI(tls.ca, ca_key, nodes)


# -- showing --------------------------------------------------------------------------------


def cert_info(cert: x509.Certificate) -> CertInfo:
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        cluster=cert_cluster(cert),
        common_name=cert_common_name(cert),
        dns_names=dns,
        ip_addresses=ips,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        serial=cert.serial_number,
        fingerprint=":".join(digest[i:i + 2] for i in range(0, len(digest), 2)),
    )


def _format_info(path: Path, info: CertInfo, now: datetime.datetime) -> list[str]:
    if now < info.not_before:
        state = "NOT YET VALID"
    elif now >= info.not_after:
        state = "EXPIRED"
    else:
        state = f"valid, {(info.not_after - now).days} days left"
    sans = [f"DNS:{d}" for d in info.dns_names] + [f"IP:{ip}" for ip in info.ip_addresses]
    return [
        f"{path}:",
        f"  subject:     {info.subject}{' (CA)' if info.is_ca else ''}",
        f"  SANs:        {', '.join(sans) or '-'}",
        f"  issuer:      {info.issuer}",
        f"  validity:    {info.not_before:%Y-%m-%d %H:%M:%S}Z to "
        f"{info.not_after:%Y-%m-%d %H:%M:%S}Z ({state})",
        f"  serial:      {info.serial:x}",
        f"  fingerprint: SHA256 {info.fingerprint}",
    ]


def _check_node_cert(config: ClusterConfig, node: NodeConfig, cert: x509.Certificate,
                     ca: x509.Certificate | None) -> list[str]:
    """What is wrong with ``cert`` as ``node``'s certificate in ``config`` (empty: nothing)."""
    info = cert_info(cert)
    problems = []
    if ca is not None and not _signed_by(cert, ca):
        problems.append("not signed by the cluster CA")
    if info.cluster != config.name:
        problems.append(f"cluster {info.cluster!r}, the config is {config.name!r}")
    if info.dns_names != (node.name,):
        problems.append(f"DNS names {list(info.dns_names)}, expected [{node.name!r}]")
    if info.ip_addresses != tuple(node_ips(node)):
        problems.append(f"IPs {list(info.ip_addresses)}, the config has {node_ips(node)}")
    return problems


def _show_config(config: ClusterConfig, out: list[str]) -> bool:
    tls = _tls(config)
    now = datetime.datetime.now(datetime.UTC)
    ok = True
    ca: x509.Certificate | None = None
    try:
        ca = load_certificate(tls.ca)
        out.extend(_format_info(tls.ca, cert_info(ca), now))
    except PKIError as e:
        out.append(f"{e}")
        ok = False
    for node in config.nodes:
        path = tls.cert_for(node.name)
        try:
            cert = load_certificate(path)
        except PKIError as e:
            out.append(f"{e}")
            ok = False
            continue
        out.extend(_format_info(path, cert_info(cert), now))
        problems = _check_node_cert(config, node, cert, ca)
        out.append(f"  check:       {'; '.join(problems) if problems else 'OK'}")
        ok &= not problems
    return ok


# -- fsha certs -----------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="fsha certs",
                                     description="Cluster PKI for the replication links.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_init = sub.add_parser("init", help="create a cluster CA (DIR/ca.crt, DIR/ca.key)")
    p_init.add_argument("dir", help="directory for ca.crt and ca.key (created if missing)")
    p_init.add_argument("--cluster", help="cluster name (default: from --config)")
    p_init.add_argument("--config", help="take the cluster name from this config file")
    p_init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity (default {CA_DAYS})")
    p_issue = sub.add_parser("issue", help="issue a node key + certificate")
    p_issue.add_argument("node", help="node name as in the config")
    p_issue.add_argument("--config", required=True, help="the cluster config file")
    p_issue.add_argument("--days", type=int, default=NODE_DAYS,
                         help=f"validity (default {NODE_DAYS})")
    p_issue.add_argument("--ca-key", help="CA key (default: the [tls] ca path with .key)")
    p_issue.add_argument("--force", action="store_true", help="replace an existing key + cert")
    p_show = sub.add_parser("show", help="print a certificate, or all of a config's")
    p_show.add_argument("file", nargs="?", help="a PEM certificate")
    p_show.add_argument("--config", help="show and check the CA and every node certificate")
    args = parser.parse_args(argv)

    try:
        if args.command == "init":
            cluster = args.cluster
            if args.config:
                config_name = load_config(args.config).name
                if cluster is not None and cluster != config_name:
                    raise PKIError(f"{args.config}: cluster is {config_name!r}, "
                                   f"--cluster says {cluster!r}")
                cluster = config_name
            if cluster is None:
                parser.error("init needs --cluster NAME or --config FILE")
            cert, key = create_ca(Path(args.dir), cluster, days=args.days)
            print(f"{cert}: CA of cluster {cluster!r} created (key {key}, mode 0600)")
            return 0
        if args.command == "issue":
            config = load_config(args.config)
            cert, key = issue_node_cert(config, args.node, days=args.days, overwrite=args.force,
                                        ca_key=Path(args.ca_key) if args.ca_key else None)
            info = cert_info(load_certificate(cert))
            sans = [f"DNS:{d}" for d in info.dns_names] + [f"IP:{i}" for i in info.ip_addresses]
            print(f"{cert}: node {args.node!r} issued, SANs {', '.join(sans)} (key {key})")
            return 0
        # show
        if (args.file is None) == (args.config is None):
            parser.error("show needs exactly one of FILE or --config FILE")
        out: list[str] = []
        if args.file is not None:
            path = Path(args.file)
            out.extend(_format_info(path, cert_info(load_certificate(path)),
                                    datetime.datetime.now(datetime.UTC)))
            ok = True
        else:
            ok = _show_config(load_config(args.config), out)
        print("\n".join(out))
        return 0 if ok else 2
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    except PKIError as e:
        print(e, file=sys.stderr)
        return 2
