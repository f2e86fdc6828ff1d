"""The wire format and the federation's certificates, without a network."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flcore.deploy import certs, wire
from flcore.errors import JobError
from tests.conftest import small_job


def test_a_payload_crosses_in_chunks_and_back() -> None:
    payload = bytes(range(256)) * (wire.CHUNK // 128 + 3)  # a few chunks and a bit
    messages = list(wire.stream({"task": "t"}, payload))
    assert len(messages) == 1 + -(-len(payload) // wire.CHUNK)
    assert all(len(m) <= wire.CHUNK for m in messages[1:])
    header, got = wire.receive(messages, len(payload), "reply")
    assert header == {"task": "t", "size": len(payload)} and got == payload


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "truncated reply: the stream ended before its header"),
        ([b"\xff"], "malformed reply header: not JSON"),
        ([b"[1]"], "malformed reply header: not a JSON object"),
        ([b"x" * (wire.MAX_HEADER + 1)], "malformed reply header: not a JSON header"),
        ([b'{"size": -1}'], "'size' must be a non-negative integer"),
        ([b'{"size": true}'], "'size' must be a non-negative integer"),
        ([b'{"size": 101}'], "oversized reply: declares 101 bytes, the limit is 100"),
        ([b'{"size": 4}', b"abc"], "truncated reply: 3 of the 4 bytes"),
        ([b'{"size": 4}', b"abc", b"de"], "oversized reply: more than the 4 bytes"),
    ],
)
def test_a_bad_stream_is_refused_with_its_reason(messages: list[bytes], reason: str) -> None:
    with pytest.raises(wire.WireError) as info:
        wire.receive(messages, 100, "reply")
    assert reason in str(info.value)


def test_a_declared_size_costs_nothing_until_its_bytes_arrive() -> None:
    import tracemalloc

    def header_then_a_chunk() -> Iterator[bytes]:
        yield wire.pack({"size": 1 << 40})  # a terabyte, declared
        yield b"x" * 1000
        peak.append(tracemalloc.get_traced_memory()[1])

    peak: list[int] = []
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError, match="truncated reply: 1000 of the 1099511627776"):
            wire.receive(header_then_a_chunk(), 1 << 40, "reply")
    finally:
        tracemalloc.stop()
    assert peak[0] < 1 << 20  # memory follows the bytes received, not the declared size


def test_certs_chain_to_the_federations_ca_and_bundles_hold_no_ca_key(tmp_path: Path) -> None:
    from cryptography import x509

    assert certs.make_ca(tmp_path) is True
    assert certs.make_ca(tmp_path) is False  # kept: the CA is made once
    certs.issue(tmp_path, "server", hosts=["127.0.0.1", "localhost"])
    certs.issue(tmp_path, "client-0")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for name in ("server", "client-0"):
        bundle = tmp_path / name
        assert sorted(p.name for p in bundle.iterdir()) == sorted(
            ["ca.pem", f"{name}.pem", f"{name}.key"]
        )
        cert = x509.load_pem_x509_certificate((bundle / f"{name}.pem").read_bytes())
        cert.verify_directly_issued_by(ca)
        assert (bundle / f"{name}.key").stat().st_mode & 0o077 == 0
        # the issuer's folder and the bundle alone both give the identity
        assert certs.read_identity(tmp_path, name) == certs.read_identity(bundle, name)
    client = x509.load_pem_x509_certificate((tmp_path / "client-0/client-0.pem").read_bytes())
    assert client.subject.rfc4514_string() == "CN=client-0"
    assert not (tmp_path / "ca.key").exists()
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o077 == 0


def test_the_flat_layout_of_earlier_folders_is_still_read(tmp_path: Path) -> None:
    certs.make_ca(tmp_path)
    certs.issue(tmp_path, "client-0")
    for file in ("ca.key", "ca.pem"):  # the CA, as earlier versions kept it
        (tmp_path / "ca" / file).rename(tmp_path / file)
    for file in ("client-0.pem", "client-0.key"):
        (tmp_path / "client-0" / file).rename(tmp_path / file)
    (tmp_path / "ca").rmdir()
    assert certs.read_identity(tmp_path, "client-0")[1].startswith(b"-----BEGIN CERTIFICATE")
    certs.issue(tmp_path, "client-1")  # the flat CA still issues
    assert (tmp_path / "client-1" / "client-1.pem").exists()


def test_keys_are_encrypted_with_a_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.make_ca(tmp_path, secret=b"ca secret")
    certs.issue(tmp_path, "client-0", secret=b"client secret", ca_secret=b"ca secret")
    for key in (tmp_path / "ca" / "ca.key", tmp_path / "client-0" / "client-0.key"):
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in key.read_bytes()
    with pytest.raises(certs.CertError, match=r"ca\.key is encrypted: give its passphrase"):
        certs.issue(tmp_path, "client-1")
    with pytest.raises(certs.CertError, match="wrong passphrase"):
        certs.issue(tmp_path, "client-1", ca_secret=b"guess")
    with pytest.raises(certs.CertError, match=r"client-0\.key is encrypted"):
        certs.read_identity(tmp_path, "client-0")
    key = certs.read_identity(tmp_path, "client-0", b"client secret")[2]
    assert key.startswith(b"-----BEGIN PRIVATE KEY")  # decrypted in memory, for gRPC
    (tmp_path / "pass").write_text("client secret\n")
    assert certs.passphrase(str(tmp_path / "pass"), "UNUSED") == b"client secret"
    monkeypatch.setenv(certs.KEY_PASSPHRASE_ENV, "from env")
    assert certs.passphrase(None, certs.KEY_PASSPHRASE_ENV) == b"from env"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(certs.CertError, match="is empty"):
        certs.passphrase(str(tmp_path / "empty"), certs.KEY_PASSPHRASE_ENV)


def test_a_revoked_certificate_is_listed_in_a_crl_the_ca_signed(tmp_path: Path) -> None:
    from cryptography import x509

    certs.make_ca(tmp_path)
    for name in ("client-0", "client-1"):
        certs.issue(tmp_path, name)
    certs.issue(tmp_path, "server", hosts=["127.0.0.1"])
    ca_pem = (tmp_path / "ca.pem").read_bytes()
    listed = certs.Revocations(tmp_path / "server" / "crl.pem", ca_pem)
    assert listed.serials == frozenset()  # no list yet: nobody revoked
    crl = certs.revoke(tmp_path, ["client-1"])
    certs.revoke(tmp_path, ["client-1"])  # again: still listed once
    pem = {n: (tmp_path / n / f"{n}.pem").read_bytes() for n in ("client-0", "client-1")}
    assert listed.reload() == 1 and listed.revoked(pem["client-1"])
    assert not listed.revoked(pem["client-0"])
    assert (tmp_path / "server" / "crl.pem").read_bytes() == crl.read_bytes()
    parsed = x509.load_pem_x509_crl(crl.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_pem)
    assert parsed.is_signature_valid(ca.public_key())
    other = tmp_path / "other"
    certs.make_ca(other)
    with pytest.raises(certs.CertError, match="not signed by the federation's CA"):
        certs.Revocations(crl, (other / "ca.pem").read_bytes())
    (tmp_path / "server" / "crl.pem").write_text("garbage")
    with pytest.raises(certs.CertError, match="cannot read the revocation list"):
        listed.reload()
    assert listed.revoked(pem["client-1"])  # the last good list is kept
    with pytest.raises(certs.CertError, match="cannot revoke client-7"):
        certs.revoke(tmp_path, ["client-7"])


def test_bad_certificate_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="cannot read the CA"):
        certs.issue(tmp_path, "client-0")
    certs.make_ca(tmp_path)
    for bad in ("", "a b", "-x", "ca", "server", "x" * 65, "../up"):
        with pytest.raises(certs.CertError, match="invalid client name"):
            certs.check_name(bad)
    with pytest.raises(certs.CertError, match="invalid host"):
        certs.issue(tmp_path, "server", hosts=["not a host"])
    with pytest.raises(certs.CertError, match=r"flcore certs .* --client client-9"):
        certs.read_identity(tmp_path, "client-9")
    certs.issue(tmp_path, "client-0")
    with pytest.raises(certs.CertError, match="a bundle handed out, not the issuer's folder"):
        certs.make_ca(tmp_path / "client-0")
    (tmp_path / "ca" / "ca.key").write_text("garbage")
    with pytest.raises(certs.CertError, match="cannot read"):
        certs.make_ca(tmp_path)


def test_allowed_clients_name_every_client_once() -> None:
    assert small_job(job={"allowed_clients": ["a", "b", "c"]}).job.allowed_clients == [
        "a",
        "b",
        "c",
    ]
    with pytest.raises(JobError, match="must name each of the 3 clients once"):
        small_job(job={"allowed_clients": ["a", "b"]})
    with pytest.raises(JobError, match="must name each of the 3 clients once"):
        small_job(job={"allowed_clients": ["a", "a", "b"]})
    with pytest.raises(JobError, match="invalid client name"):
        small_job(job={"allowed_clients": ["a", "b", "no spaces"]})
    with pytest.raises(JobError, match="round_timeout"):
        small_job(job={"round_timeout": 0})
