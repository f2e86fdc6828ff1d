"""``flcore certs``: a federation's root CA, the server and client certificates it issues,
and the list of revoked client certificates.

Keys are ECDSA P-256, encrypted with a passphrase when one is given. A client certificate's
common name is the client's name, which the server checks against the job's allowed clients;
a server certificate names the hosts (DNS names or IP addresses) clients reach it by.

The issuer's folder keeps the CA apart from what is handed out::

    FOLDER/ca/ca.pem, ca/ca.key       the CA: stays with whoever issues certificates
    FOLDER/ca.pem                     the CA's certificate (public)
    FOLDER/NAME/ca.pem, NAME.pem, NAME.key   one bundle per server (NAME = server) or client
    FOLDER/crl.pem                    revoked client certificates (copied to FOLDER/server/)

A folder in the earlier flat layout (``ca.key`` and every ``NAME.pem`` side by side) is still
read, and is where new certificates are issued from.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from flcore.errors import FLCoreError

CA_DIR = "ca"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CRL = "crl.pem"
SERVER = "server"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Where a passphrase comes from when no ``--passphrase-file`` is given.
KEY_PASSPHRASE_ENV = "FLCORE_KEY_PASSPHRASE"
CA_PASSPHRASE_ENV = "FLCORE_CA_PASSPHRASE"


class CertError(FLCoreError):
    """A certificate could not be made or read; the message says which file and why."""


def check_name(name: str) -> str:
    if not NAME.match(name) or name in {CA_DIR, SERVER}:
        raise CertError(
            f"invalid client name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and not 'ca' or 'server'"
        )
    return name


def passphrase(file: str | None, env: str) -> bytes | None:
    """The passphrase in ``file`` (its trailing newline dropped), else in the environment
    variable ``env``, else None: keys are then written, and read, unencrypted."""
    if file is not None:
        try:
            text = Path(file).read_bytes().rstrip(b"\r\n")
        except OSError as err:
            raise CertError(f"cannot read the passphrase file {file}: {err.strerror}") from None
        where = file
    else:
        value = os.environ.get(env)
        if value is None:
            return None
        text, where = value.encode(), f"${env}"
    if not text:
        raise CertError(f"the passphrase in {where} is empty")
    return text


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_bytes(key: Any, secret: bytes | None) -> bytes:
    from cryptography.hazmat.primitives import serialization

    encryption: Any = (
        serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
    )
    return bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )


def _load_key(data: bytes, secret: bytes | None, path: Path, option: str) -> Any:
    """The private key in ``data``, decrypted with ``secret`` when it is encrypted."""
    from cryptography.hazmat.primitives import serialization

    encrypted = b"ENCRYPTED" in data
    if encrypted and secret is None:
        raise CertError(f"{path} is encrypted: give its passphrase ({option})")
    try:
        return serialization.load_pem_private_key(data, password=secret if encrypted else None)
    except ValueError as err:
        why = "wrong passphrase, or not a key" if encrypted else str(err)
        raise CertError(f"cannot read {path}: {why}") from None


def unlock_key(data: bytes, secret: bytes | None, path: Path) -> bytes:
    """``data`` as the unencrypted PEM gRPC takes, decrypted in memory when it is encrypted."""
    if b"ENCRYPTED" not in data:
        return data
    option = f"--passphrase-file or ${KEY_PASSPHRASE_ENV}"
    return _key_bytes(_load_key(data, secret, path, option), None)


def _ca_files(folder: Path) -> tuple[Path, Path]:
    """The CA's certificate and key: in ``ca/``, or side by side in the flat layout."""
    if (folder / CA_KEY).exists():
        return folder / CA_CERT, folder / CA_KEY
    return folder / CA_DIR / CA_CERT, folder / CA_DIR / CA_KEY


def _load_ca(folder: Path, secret: bytes | None = None) -> tuple[Any, Any]:
    from cryptography import x509

    cert_path, key_path = _ca_files(folder)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        data = key_path.read_bytes()
    except (OSError, ValueError) as err:
        raise CertError(f"cannot read the CA in {folder}: {err}") from err
    option = f"--ca-passphrase-file or ${CA_PASSPHRASE_ENV}"
    return cert, _load_key(data, secret, key_path, option)


def make_ca(
    folder: Path,
    name: str = "flcore federation",
    days: int = 3650,
    secret: bytes | None = None,
) -> bool:
    """Create ``ca/ca.pem`` and ``ca/ca.key`` (encrypted with ``secret``) and the public
    ``ca.pem`` in ``folder`` unless a CA is there; True if created."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = _ca_files(folder)
    if cert_path.exists() or key_path.exists():
        _load_ca(folder, secret)  # both there and readable, or a clear error
        return False
    if (folder / CA_CERT).exists():
        raise CertError(
            f"{folder} holds a {CA_CERT} but not the CA's key: it is a bundle handed out, "
            "not the issuer's folder"
        )
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
    key_path.parent.mkdir(mode=0o700, exist_ok=True)
    _write(key_path, _key_bytes(key, secret), private=True)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    _write(cert_path, pem)
    _write(folder / CA_CERT, pem)
    return True


def issue(
    folder: Path,
    name: str,
    hosts: list[str] | None = None,
    days: int = 825,
    secret: bytes | None = None,
    ca_secret: bytes | None = None,
) -> Path:
    """Issue the bundle ``NAME/`` (``ca.pem``, ``NAME.pem``, ``NAME.key`` encrypted with
    ``secret``) signed by the CA in ``folder``: a server certificate for ``hosts`` when
    given, else a client certificate whose common name is ``name``. Returns ``NAME.pem``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = _load_ca(folder, ca_secret)
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
    bundle = folder / name
    bundle.mkdir(mode=0o700, exist_ok=True)
    _write(bundle / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(bundle / f"{name}.key", _key_bytes(key, secret), private=True)
    path = bundle / f"{name}.pem"
    _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return path


def identity_folder(folder: Path, name: str) -> Path:
    """Where ``name``'s files are: ``folder`` itself (a bundle, or the flat layout), else
    its bundle ``folder/NAME`` (the issuer's folder)."""
    nested = folder / name
    if not (folder / f"{name}.pem").exists() and nested.is_dir():
        return nested
    return folder


def read_identity(
    folder: Path, name: str, secret: bytes | None = None
) -> tuple[bytes, bytes, bytes]:
    """``(ca.pem, NAME.pem, NAME.key)`` from ``folder`` or its bundle ``NAME/``, the key
    decrypted with ``secret``, or a :class:`CertError` naming the missing file and the
    ``flcore certs`` call that makes it."""
    where = identity_folder(folder, name)
    out = []
    for file in (CA_CERT, f"{name}.pem", f"{name}.key"):
        path = where / file
        try:
            out.append(path.read_bytes())
        except OSError as err:
            hint = "--host HOST" if name == SERVER else f"--client {name}"
            raise CertError(
                f"cannot read {path}: {err.strerror} (make it with `flcore certs {folder} {hint}`)"
            ) from None
    return out[0], out[1], unlock_key(out[2], secret, where / f"{name}.key")


@functools.lru_cache(maxsize=256)
def certificate_serial(pem: bytes) -> int | None:
    """The serial number of the certificate in ``pem`` (None if it is not one); cached,
    since the server asks it of every call's peer."""
    from cryptography import x509

    try:
        return int(x509.load_pem_x509_certificate(pem).serial_number)
    except ValueError:
        return None


def _read_crl(path: Path, ca_cert: Any) -> Any:
    """The CRL at ``path``, checked to be signed by the CA, or None when there is none."""
    from cryptography import x509

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CertError(f"cannot read the revocation list {path}: {err.strerror}") from None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as err:
        raise CertError(f"cannot read the revocation list {path}: {err}") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise CertError(f"the revocation list {path} is not signed by the federation's CA")
    return crl


def revoked_serials(path: Path, ca_pem: bytes) -> frozenset[int]:
    """The serial numbers the CRL at ``path`` revokes (none when there is no file); a CRL
    that is unreadable or not signed by the CA in ``ca_pem`` is a :class:`CertError`."""
    from cryptography import x509

    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as err:
        raise CertError(f"cannot read the CA certificate: {err}") from None
    crl = _read_crl(path, ca_cert)
    return frozenset(r.serial_number for r in crl) if crl is not None else frozenset()


def revoke(folder: Path, names: list[str], ca_secret: bytes | None = None) -> Path:
    """Add the certificates of ``names`` (their bundles in ``folder``) to ``folder/crl.pem``,
    a CRL signed by the CA, and copy it to the server's bundle; returns the CRL's path.
    A server reads it at its start and again on SIGHUP."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert, ca_key = _load_ca(folder, ca_secret)
    path = folder / CRL
    old = _read_crl(path, ca_cert)
    now = datetime.datetime.now(datetime.UTC)
    entries = {r.serial_number: r.revocation_date_utc for r in old} if old is not None else {}
    for name in names:
        cert_path = identity_folder(folder, check_name(name)) / f"{name}.pem"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as err:
            raise CertError(f"cannot revoke {name}: cannot read {cert_path}: {err}") from None
        entries.setdefault(cert.serial_number, now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(max(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=1)))
    )
    for serial, when in sorted(entries.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    _write(path, pem)
    if (folder / SERVER).is_dir():
        _write(folder / SERVER / CRL, pem)
    return path


class Revocations:
    """The serial numbers of revoked client certificates, read from a CRL at ``path`` (none
    while there is no file): at a server's start, and again when it asks (on SIGHUP)."""

    def __init__(self, path: Path, ca_pem: bytes) -> None:
        self.path = path
        self.ca_pem = ca_pem
        self.serials = revoked_serials(path, ca_pem)

    def reload(self) -> int:
        """Read the list again (a :class:`CertError` keeps the last one); how many it revokes."""
        self.serials = revoked_serials(self.path, self.ca_pem)
        return len(self.serials)

    def revoked(self, cert_pem: bytes) -> bool:
        return certificate_serial(cert_pem) in self.serials
