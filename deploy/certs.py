"""Local TLS material for a loopback deployment, made with ``cryptography``.

- a private certificate authority (``ca.crt``, ``ca.key``): the SuperLink's ``--ssl-ca-certfile``, and the trust
  anchor of every client (SuperNodes' ``--root-certificates``, the Flower CLI's ``root-certificates``);
- a server certificate signed by it (``server.pem``, ``server.key``) whose subject alternative names cover the
  loopback addresses (``127.0.0.1``, ``::1``, ``localhost`` by default): the SuperLink's ``--ssl-certfile`` and
  ``--ssl-keyfile`` (Flower 1.41 serves its Fleet, Control and Runtime APIs with that one certificate);
- SuperNode authentication keys: an EC P-384 key pair per node in OpenSSH format, the format that
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read (the checks of key files
  and CA certificates handed over between hosts are in :mod:`deploy.keys`).

Private keys are written with mode 0600, every file atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


class CertError(ValueError):
    """Missing, unreadable or mismatched TLS/authentication material (the message names the file)."""


@dataclass(frozen=True)
class CertPaths:
    """Where one deployment's TLS files live."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.dir / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.dir / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.dir / SERVER_KEY

    def required(self) -> tuple[Path, Path, Path]:
        """The three files the SuperLink needs (the CA key is only needed to issue new certificates)."""
        return self.ca_cert, self.server_cert, self.server_key

    def missing(self) -> list[Path]:
        return [p for p in self.required() if not p.is_file()]


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca(common_name: str = "fedrank deployment CA", days: int = 365,
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate that may sign server certificates only (path length 0)."""
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrank")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
                     hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365,
                     ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for ``hosts`` (IP addresses and DNS names), signed by the CA."""
    if not hosts:
        raise CertError("a server certificate needs at least one host name or IP address")
    key = _new_key()
    now = dt.datetime.now(dt.UTC)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedrank")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                                     content_commitment=False, data_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def generate_certs(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365,
                   overwrite: bool = False) -> CertPaths:
    """Write a new CA and a server certificate for ``hosts`` into ``out_dir``.

    Existing files are kept unless ``overwrite`` (a running SuperLink and its clients must agree on the CA);
    a folder holding only part of the set is an error naming the missing files.
    """
    paths = CertPaths(Path(out_dir))
    present = [p for p in (*paths.required(), paths.ca_key) if p.is_file()]
    if present and not overwrite:
        missing = paths.missing()
        if missing:
            raise CertError(f"{paths.dir}: incomplete TLS material, missing {', '.join(p.name for p in missing)} "
                            "(regenerate with `fedrank deploy certs --overwrite`)")
        return paths
    ca, ca_key = make_ca(days=days)
    server, server_key = make_server_cert(ca, ca_key, hosts, days)
    _write(paths.ca_key, _pem_key(ca_key), private=True)
    _write(paths.server_key, _pem_key(server_key), private=True)
    _write(paths.server_cert, server.public_bytes(serialization.Encoding.PEM))
    _write(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    return paths


def load_cert(path: str | Path) -> x509.Certificate:
    p = Path(path)
    if not p.is_file():
        raise CertError(f"{p}: certificate file not found")
    try:
        return x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError as e:
        raise CertError(f"{p}: not a PEM certificate ({e})") from e


def check_certs(paths: CertPaths, host: str = "127.0.0.1") -> None:
    """Fail with a clear message unless the server certificate is signed by the CA, valid now, and names ``host``."""
    missing = paths.missing()
    if missing:
        raise CertError(f"missing TLS files: {', '.join(map(str, missing))} (create them with `fedrank deploy certs "
                        f"--dir {paths.dir}`)")
    ca, server = load_cert(paths.ca_cert), load_cert(paths.server_cert)
    try:
        server.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise CertError(f"{paths.server_cert}: not issued by {paths.ca_cert} ({e})") from e
    except InvalidSignature as e:
        raise CertError(f"{paths.server_cert}: signature does not verify against {paths.ca_cert}") from e
    now = dt.datetime.now(dt.UTC)
    for p, c in ((paths.ca_cert, ca), (paths.server_cert, server)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise CertError(f"{p}: not valid now (valid {c.not_valid_before_utc} .. {c.not_valid_after_utc})")
    if host not in san_names(server):
        raise CertError(f"{paths.server_cert}: subject alternative names {san_names(server)} do not include {host}")
    key = serialization.load_pem_private_key(paths.server_key.read_bytes(), None)
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            server.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertError(f"{paths.server_key}: does not match the public key of {paths.server_cert}")


def san_names(cert: x509.Certificate) -> list[str]:
    """The certificate's subject alternative names as strings (IP addresses in their canonical form)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))


# ------------------------------------------------------------------------------------ SuperNode authentication

@dataclass(frozen=True)
class NodeKey:
    private: Path
    public: Path


def generate_node_key(private_path: str | Path, overwrite: bool = False) -> NodeKey:
    """An EC P-384 key pair in OpenSSH format (``<private_path>`` and ``<private_path>.pub``)."""
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    if priv.is_file() and pub.is_file() and not overwrite:
        return NodeKey(priv, pub)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH) + b"\n")
    return NodeKey(priv, pub)
