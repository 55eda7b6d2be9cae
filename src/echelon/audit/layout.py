"""Where a run keeps its audit evidence.

    RUN/audit/global.jsonl              the global plane's log
    RUN/audit/boundary.<id>.jsonl       boundary <id>'s log
    RUN/audit/<party>.pub.pem           each party's Ed25519 public key

Private keys never enter the run directory: each party keeps `<party>.key.pem` (mode 0600) in a
key directory of its own (mode 0700).
"""

from __future__ import annotations

from pathlib import Path

from echelon.audit.record import PARTY

AUDIT_DIR = "audit"
LOG_SUFFIX = ".jsonl"


def audit_dir(run_dir: Path) -> Path:
    return Path(run_dir) / AUDIT_DIR


def log_path(run_dir: Path, party: str) -> Path:
    return audit_dir(run_dir) / f"{party}{LOG_SUFFIX}"


def public_key_path(directory: Path, party: str) -> Path:
    """`<party>.pub.pem` in `directory` (the run's audit directory, or an auditor's trusted keys)."""
    return Path(directory) / f"{party}.pub.pem"


def private_key_path(key_dir: Path, party: str) -> Path:
    return Path(key_dir) / f"{party}.key.pem"


def party_of_log(path: Path) -> str | None:
    """The party a log file belongs to, from its name; None when the name is not a log's."""
    name = Path(path).name
    if not name.endswith(LOG_SUFFIX):
        return None
    party = name[: -len(LOG_SUFFIX)]
    return party if PARTY.fullmatch(party) else None


def check_party(party: str) -> None:
    """ValueError unless `party` is `global` or `boundary.<id>` (a config identifier)."""
    if not PARTY.fullmatch(party):
        raise ValueError(f"party {party!r} is neither 'global' nor 'boundary.<id>'")
