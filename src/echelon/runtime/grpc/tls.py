"""Mutual TLS for a deployment: a deployment CA, one certificate per party, and peer identity.

Parties are `global`, `boundary.<id>` and `device.<id>`. Each certificate's common name is the
party; a device's certificate also names its boundary (organizational unit `boundary.<id>`), so a
boundary admits only its own devices. Server certificates carry the party name, `localhost` and
127.0.0.1 as subject alternative names; clients check the server's name against the party they
expect (`ssl_target_name_override`), so a device cannot be steered to another boundary.

Layout written by `echelon certs init`:

    CERTS/ca.pem                      the deployment CA certificate (public)
    CERTS/<party>/cert.pem            the party's certificate
    CERTS/<party>/key.pem             its TLS private key (0600, directory 0700)
    CERTS/<party>/<party>.key.pem     its Ed25519 audit-log signing key (0600; not for devices)
    CERTS/audit-keys.json             every audit public key, pinned (give it to the auditor)
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from echelon.audit.anchor import PINS_FILE, deployment_id, write_pins
from echelon.audit.keys import generate_signing_key, load_signing_key
from echelon.errors import UserError
from echelon.parties import device_id_of, run_parties
from echelon.secagg.identity import Identity, Signer, Verifier

VALIDITY = datetime.timedelta(days=365)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "echelon deployment")]
    if unit is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def init_certs(directory: Path, boundaries: dict[str, list[str]]) -> list[str]:
    """Create the CA and every party's certificate, TLS key and audit key under `directory`.

    `boundaries` maps boundary id -> its device ids. UserError when `directory` already holds a
    CA (certificates are never silently replaced). Returns the parties created.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(
            f"{directory} exists and is not a directory; choose another directory for the certificates"
        )
    if (directory / "ca.pem").exists():
        raise UserError(f"{directory} already holds a deployment CA (ca.pem); choose another directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write certificates in {directory}: {e.strerror}") from None
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = _name("echelon deployment CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    parties = run_parties(boundaries)
    audit_keys = {}
    for party, boundary in parties:
        party_dir = directory / party
        party_dir.mkdir(mode=0o700)
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(party, boundary))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(party),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write(party_dir / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(party_dir / "key.pem", _pem_key(key), 0o600)
        if device_id_of(party) is None:
            audit_keys[party] = generate_signing_key(party_dir, party).public_key()
    # The CA key is not kept: nobody can mint a certificate for this deployment afterwards.
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write(directory / "ca.pem", ca_pem, 0o644)
    write_pins(directory / PINS_FILE, audit_keys, deployment_id(ca_pem))
    return [p for p, _ in parties]


@dataclass(frozen=True)
class Credentials:
    """One party's TLS material as PEM bytes, and its audit signing key path."""

    party: str
    ca: bytes
    cert: bytes
    key: bytes
    directory: Path

    def audit_key(self):
        return load_signing_key(self.directory / f"{self.party}.key.pem")

    def identity(self) -> Identity:
        """The party's SecAgg+ identity: it signs with its certificate's key, trusts the CA."""
        return Identity(Verifier.from_pem(self.ca), Signer.from_pem(self.cert, self.key))


def load_credentials(directory: Path, party: str) -> Credentials:
    """`party`'s credentials from a `certs init` directory; UserError naming what is missing."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"--certs {directory} is not a directory: run `echelon certs init RUN.yaml --out {directory}` to "
            "create the deployment's certificates"
        )
    party_dir = directory / party
    paths = [directory / "ca.pem", party_dir / "cert.pem", party_dir / "key.pem"]
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"{path} is missing: run `echelon certs init RUN.yaml --out {directory}` to create "
                f"the deployment's certificates"
            )
    try:
        ca, cert, key = (p.read_bytes() for p in paths)
    except OSError as e:
        raise UserError(f"cannot read {party}'s certificates in {directory}: {e.strerror}") from None
    return Credentials(party, ca, cert, key, party_dir)


def peer_identity(auth_context: dict) -> tuple[str | None, str | None]:
    """(party, boundary unit) from a gRPC server's auth context; (None, None) without a TLS peer."""
    if auth_context.get("transport_security_type", [b""])[0] != b"ssl":
        return None, None
    pem = auth_context.get("x509_pem_cert", [b""])[0]
    if not pem:
        return None, None
    cert = x509.load_pem_x509_certificate(pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else None), (str(ou[0].value) if ou else None)
