"""Checks of the files that change hands between hosts in a deployment across hosts (``deploy server`` /
``deploy node``): a device's public key (to the operator), its private key (stays on the device) and the
SuperLink's CA certificate (to every device). Each is checked the way Flower will read it; a :class:`CertError`
names the flag and the file.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy.certs import CertError, load_cert


def read_node_public_key(path: str | Path, what: str = "node key") -> str:
    """The OpenSSH line of a SuperNode's public key, checked the way ``flwr supernode register`` checks it
    (an EC key on a NIST curve); a :class:`CertError` naming the file otherwise."""
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    p = Path(path)
    if not p.is_file():
        raise CertError(f"{what} {p}: file not found")
    data = p.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm) as e:
        hint = " (that is the private half: give the .pub file)" if b"PRIVATE KEY" in data else ""
        raise CertError(f"{what} {p}: not an OpenSSH public key{hint}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not uses_nist_ec_curve(key):
        raise CertError(f"{what} {p}: SuperNode authentication needs an EC key on a NIST curve (make one with "
                        "`fedrank deploy node-key`)")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def check_node_private_key(path: str | Path, what: str = "--key") -> str:
    """Check a SuperNode's private key as ``flower-supernode --auth-supernode-private-key`` loads it; returns
    the OpenSSH line of its public half."""
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    p = Path(path)
    if not p.is_file():
        raise CertError(f"{what} {p}: file not found (make a key pair with `fedrank deploy node-key`)")
    data = p.read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        hint = " (that is the public half: give the private key)" if data.startswith(b"ecdsa-") else ""
        raise CertError(f"{what} {p}: not an unencrypted OpenSSH private key{hint}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not uses_nist_ec_curve(key.public_key()):
        raise CertError(f"{what} {p}: SuperNode authentication needs an EC key on a NIST curve (make one with "
                        "`fedrank deploy node-key`)")
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def check_ca_cert(path: str | Path, what: str = "--ca") -> x509.Certificate:
    """A PEM CA certificate, valid now (what a SuperNode trusts the SuperLink through)."""
    p = Path(path)
    try:
        cert = load_cert(p)
    except CertError as e:
        raise CertError(f"{what} {e}") from e
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"{what} {p}: not a CA certificate (give the SuperLink's ca.crt, not its server.pem)")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(f"{what} {p}: not valid now (valid {cert.not_valid_before_utc} .. "
                        f"{cert.not_valid_after_utc})")
    return cert
