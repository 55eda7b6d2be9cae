"""Who a SecAgg+ participant is, for rounds defended against a malicious server.

A participant signs what it advertises (and later the survivor set) with its certificate's key;
its peers check the certificate against the deployment CA and the signature against the
certificate. The server cannot mint certificates (the deployment discards the CA key), so it can
neither substitute a participant's keys nor invent participants.

- `Signer`: a certificate and its private key (ECDSA P-256 in a deployment, Ed25519 in
  simulation); signatures are 64 bytes (Ed25519, or ECDSA as r || s), so their size never varies.
- `Verifier`: the CA certificate. `peer` accepts a certificate issued by the CA for a party of
  the same kind as the verifying one (a device of the same boundary, or another boundary).
- `Identity`: a party's verifier and (for a participant) its signer.
- `simulated_identities`: a throwaway in-memory CA and one signer per party, derived from a
  seed, so a simulated run stays bit-for-bit repeatable.

Certificate validity dates are not checked here (the protocol reads no clock); the deployment's
mutual TLS checks them on every connection.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import NameOID

SIGNATURE_BYTES = 64
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def _names(cert: x509.Certificate) -> tuple[str, str | None]:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return (str(cn[0].value) if cn else ""), (str(ou[0].value) if ou else None)


def verify_signature(key: PublicKey, signature: bytes, data: bytes) -> None:
    """ValueError unless `signature` (64 bytes) is `key`'s signature of `data`."""
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"a signature is {SIGNATURE_BYTES} B, not {len(signature)}")
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
        else:
            r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("the signature does not verify") from None


@dataclass(frozen=True)
class Signer:
    """A participant's certificate (DER) and the private key it certifies."""

    certificate: bytes
    key: PrivateKey

    @classmethod
    def from_pem(cls, certificate_pem: bytes, key_pem: bytes) -> Signer:
        """A deployment party's signer: its TLS certificate and key (`echelon certs init`)."""
        cert = x509.load_pem_x509_certificate(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"a {type(key).__name__} cannot sign SecAgg+ messages")
        return cls(cert.public_bytes(serialization.Encoding.DER), key)

    @cached_property
    def public_key(self) -> PublicKey:
        return self.key.public_key()

    @cached_property
    def names(self) -> tuple[str, str | None]:
        """(common name, organizational unit) of the certificate: the party and its boundary."""
        return _names(x509.load_der_x509_certificate(self.certificate))

    def sign(self, data: bytes) -> bytes:
        """The 64-byte signature of `data`."""
        if isinstance(self.key, Ed25519PrivateKey):
            return self.key.sign(data)
        r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True)
class Verifier:
    """The deployment CA, against which participants check each other's certificates."""

    ca: x509.Certificate

    @classmethod
    def from_pem(cls, ca_pem: bytes) -> Verifier:
        return cls(x509.load_pem_x509_certificate(ca_pem))

    def _issued(self, certificate: bytes) -> tuple[x509.Certificate, PublicKey]:
        try:
            cert = x509.load_der_x509_certificate(certificate)
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ValueError(
                f"a certificate the deployment CA did not issue ({e or type(e).__name__})"
            ) from None
        key = cert.public_key()
        if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"a certificate for a {type(key).__name__}, which cannot sign")
        return cert, key

    def key(self, certificate: bytes) -> PublicKey:
        """The public key of a certificate the CA issued; ValueError otherwise."""
        return self._issued(certificate)[1]

    def peer(self, certificate: bytes, own: Signer) -> PublicKey:
        """The public key of a peer of `own`: issued by the CA, another party of the same kind
        (a device of the same boundary, or another boundary). ValueError otherwise."""
        cert, key = self._issued(certificate)
        (cn, ou), (own_cn, own_ou) = _names(cert), own.names
        if cn == own_cn or ou != own_ou or cn.split(".", 1)[0] != own_cn.split(".", 1)[0]:
            raise ValueError(f"the certificate of {cn!r} ({ou}) is not a peer of {own_cn!r} ({own_ou})")
        return key


@dataclass(frozen=True)
class Identity:
    """What one party brings to defended rounds: the CA it trusts, and its own signer (None for
    a party that only ever serves rounds)."""

    verifier: Verifier
    signer: Signer | None = None


def fingerprint(certificate: bytes) -> bytes:
    return hashlib.sha256(certificate).digest()


_EPOCH = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)


def _seeded_key(seed: int, name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest())


def _certificate(
    subject: str,
    unit: str | None,
    key: Ed25519PrivateKey,
    issuer: str,
    signer: Ed25519PrivateKey,
    serial: int,
) -> x509.Certificate:
    def name(cn: str, ou: str | None) -> x509.Name:
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "echelon simulation")]
        if ou is not None:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
        return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    builder = (
        x509.CertificateBuilder()
        .subject_name(name(subject, unit))
        .issuer_name(name(issuer, None))
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_EPOCH)
        .not_valid_after(_EPOCH + datetime.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None), critical=True)
    )
    return builder.sign(signer, None)


def simulated_identities(parties: dict[str, str | None], seed: int) -> tuple[Verifier, dict[str, Signer]]:
    """An in-memory CA and a signer for each party (name -> its boundary unit or None), all
    derived from `seed`: a simulation's stand-in for `echelon certs init`."""
    ca_name = "echelon simulation CA"
    ca_key = _seeded_key(seed, ca_name)
    ca = _certificate(ca_name, None, ca_key, ca_name, ca_key, 1)
    signers = {}
    for serial, (party, unit) in enumerate(sorted(parties.items()), start=2):
        key = _seeded_key(seed, party)
        cert = _certificate(party, unit, key, ca_name, ca_key, serial)
        signers[party] = Signer(cert.public_bytes(serialization.Encoding.DER), key)
    return Verifier(ca), signers
