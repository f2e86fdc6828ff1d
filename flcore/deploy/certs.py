"""``flcore certs``: a federation's root CA, and server and client certificates it issues.

Keys are ECDSA P-256. A client certificate's common name is the client's name, which the
server checks against the job's allowed clients; a server certificate names the hosts
(DNS names or IP addresses) clients reach it by.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from flcore.errors import FLCoreError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER = "server"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CertError(FLCoreError):
    """A certificate could not be made or read; the message says which file and why."""


def check_name(name: str) -> str:
    if not NAME.match(name) or name in {"ca", SERVER}:
        raise CertError(
            f"invalid client name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'ca' or 'server'"
        )
    return name


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _load_ca(folder: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise CertError(f"cannot read the CA in {folder}: {err}") from err
    return cert, key


def make_ca(folder: Path, name: str = "flcore federation", days: int = 3650) -> bool:
    """Create ``ca.pem`` and ``ca.key`` in ``folder`` unless they exist; True if created."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CA_CERT).exists() or (folder / CA_KEY).exists():
        _load_ca(folder)  # both there and readable, or a clear error
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(
        folder / CA_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    _write(folder / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    return True


def issue(folder: Path, name: str, hosts: list[str] | None = None, days: int = 825) -> Path:
    """Issue ``NAME.pem``/``NAME.key`` signed by the CA in ``folder``: a server certificate
    for ``hosts`` when given, else a client certificate whose common name is ``name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for host in hosts or [name]:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not NAME.match(host):
                raise CertError(
                    f"invalid host {host!r}: give a DNS name or an IP address"
                ) from None
            alt.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(
        folder / f"{name}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    path = folder / f"{name}.pem"
    _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return path


def read_identity(folder: Path, name: str) -> tuple[bytes, bytes, bytes]:
    """``(ca.pem, NAME.pem, NAME.key)`` from ``folder``, or a :class:`CertError` naming the
    missing file and the ``flcore certs`` call that makes it."""
    out = []
    for file in (CA_CERT, f"{name}.pem", f"{name}.key"):
        path = folder / file
        try:
            out.append(path.read_bytes())
        except OSError as err:
            hint = "--host HOST" if name == SERVER else f"--client {name}"
            raise CertError(
                f"cannot read {path}: {err.strerror} (make it with `flcore certs {folder} {hint}`)"
            ) from None
    return out[0], out[1], out[2]
