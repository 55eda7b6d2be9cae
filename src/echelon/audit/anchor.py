"""What ties a run's audit logs to the run and to keys a verifier can trust.

- `RunBinding`: the run id and the digest of the run's (effective) configuration. Every party's
  log names both in its header, and every checkpoint signature covers them, so a log or a
  checkpoint of another run, or of another configuration, does not verify here.
- `config_digest`: SHA-256 of the canonical JSON of a validated configuration. The verifier
  recomputes it from RUN/config.yaml and derives the parties that must have logs from it.
- A pins file (`audit-keys.json`, written by `echelon certs init` beside the deployment CA): each
  party's Ed25519 audit public key and the deployment id (the SHA-256 of the CA certificate,
  which is a deployment's run id). Given to `echelon audit --keys`, it anchors the signatures:
  a log re-signed under any other key fails, whatever public keys the run directory holds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.audit.keys import write_new
from echelon.audit.record import canonical
from echelon.config import RunConfig
from echelon.errors import UserError
from echelon.parties import GLOBAL, boundary_party

PINS_FILE = "audit-keys.json"
PINS_FORMAT = "echelon-audit-keys/1"


@dataclass(frozen=True)
class RunBinding:
    """The run id and configuration digest every log of one run carries and signs."""

    run_id: str
    config_sha256: str


def new_run_id() -> str:
    """A fresh random run id (simulation; a deployment's is its CA's `deployment_id`)."""
    return secrets.token_hex(16)


def deployment_id(ca_pem: bytes) -> str:
    """The id of a deployment: hex SHA-256 of its CA certificate (DER)."""
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def config_digest(cfg: RunConfig) -> str:
    """Hex SHA-256 of the canonical JSON of a validated configuration."""
    return hashlib.sha256(canonical(cfg.model_dump(mode="json"))).hexdigest()


def parties_of(cfg: RunConfig) -> list[str]:
    """The parties of a run that write audit logs, for an `effective_config`: the global plane
    and every boundary."""
    return [GLOBAL, *(boundary_party(b.id) for b in cfg.boundaries)]


def write_pins(path: Path, keys: dict[str, Ed25519PublicKey], deployment: str) -> None:
    """Write the pins file for `keys` (party -> audit public key) of deployment `deployment`,
    whole or not at all; never replaces a file."""
    raw = {
        p: k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for p, k in keys.items()
    }
    doc = {
        "format": PINS_FORMAT,
        "deployment": deployment,
        "parties": {
            p: {"ed25519": base64.b64encode(r).decode(), "fingerprint": hashlib.sha256(r).hexdigest()}
            for p, r in sorted(raw.items())
        },
    }
    try:
        write_new(path, json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n", 0o644)
    except FileExistsError:
        raise UserError(f"{path} already exists; refusing to replace pinned keys") from None


@dataclass(frozen=True)
class Pins:
    """Audit public keys a verifier trusts, by party, and the deployment they belong to."""

    path: Path
    deployment: str | None
    keys: dict[str, Ed25519PublicKey]


def load_pins(path: Path) -> Pins:
    """The pins file at `path` (or `path`/audit-keys.json for a directory); UserError naming the
    file and the field when it is unreadable or inconsistent."""
    path = Path(path)
    if path.is_dir():
        path = path / PINS_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"cannot read pinned keys {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(
            f"{path} is not JSON ({e}); give the {PINS_FILE} written by `echelon certs init`"
        ) from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != PINS_FORMAT
        or not isinstance(doc.get("parties"), dict)
    ):
        raise UserError(f"{path}: not a pinned keys file (format {PINS_FORMAT!r} with `parties`)")
    keys = {}
    for party, entry in doc["parties"].items():
        try:
            raw = base64.b64decode(entry["ed25519"], validate=True)
            key = Ed25519PublicKey.from_public_bytes(raw)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: parties.{party}.ed25519 is not a base64 Ed25519 public key") from None
        if entry.get("fingerprint") != hashlib.sha256(raw).hexdigest():
            raise UserError(f"{path}: parties.{party}.fingerprint does not match its key")
        keys[party] = key
    deployment = doc.get("deployment")
    if deployment is not None and not isinstance(deployment, str):
        raise UserError(f"{path}: deployment must be a string")
    return Pins(path, deployment, keys)
