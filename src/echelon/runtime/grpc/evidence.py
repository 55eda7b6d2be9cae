"""What a deployed party keeps on disk as it goes: its audit log (with the refusals its guards
did not record themselves) and checkpoints of its plane.

Checkpoints are state dicts (`plane.state_dict()`: tensors and plain values), loaded with
`torch.load(weights_only=True)`: no pickled object is ever executed on resume. A checkpoint is
written to a temporary file and renamed; when writing fails (a full disk), the temporary file is
removed and the last good checkpoint stays.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from google.protobuf.message import Message

from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.contract.rules import flow_class_name, round_of, tensor_summary
from echelon.errors import UserError
from echelon.runtime.grpc.tls import Credentials
from echelon.v1 import boundary_pb2

log = logging.getLogger("echelon.serve")


def open_audit(run_dir: Path, party: str, creds: Credentials, min_quorum: int) -> AuditLog:
    """The party's audit log: continued after a restart (a torn last line is cut, and recorded)."""
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = log_path(run_dir, party)
    if path.exists():
        return AuditLog.open(path, creds.audit_key(), repair=True)
    return AuditLog.create(path, party, creds.audit_key(), "wall", min_quorum=min_quorum)


def record_refusal(
    audit: AuditLog, now: float, party: str, peer: str, frame: bytes, body: Message | None, reason: str
) -> None:
    """Record that `party` refused what `peer` sent (`frame`, or a stream: b"") for `reason`:
    the refusals its ingress guard did not record (a plane refusing a message, an unexpected
    error, a refused stream). Nothing is recorded when `peer` is not a party name."""
    body = body if body is not None else boundary_pb2.CrossBoundaryEnvelope()
    try:
        provenance, quorum = tensor_summary(body)
    except ValueError:  # an enum value this schema does not know
        provenance, quorum = None, 0
    try:
        audit.append(
            time=now,
            channel=f"{peer}<->{party}",
            direction="in",
            peer=peer,
            message_type=body.DESCRIPTOR.full_name,
            flow_class=flow_class_name(body.DESCRIPTOR),
            wire_bytes=len(frame),
            round_id=round_of(body),
            payload_sha256=hashlib.sha256(frame).hexdigest(),
            quorum=quorum,
            provenance=provenance,
            outcome="refused",
            reason=reason,
        )
    except ValueError as e:  # e.g. a peer that is no party name: the log line is the record
        log.debug("refusal not recorded in the audit log: %s", e)


def checkpoint_path(run_dir: Path, party: str) -> Path:
    return run_dir / "checkpoints" / f"{party}.pt"


def save_checkpoint(path: Path, state: dict) -> bool:
    """Write `state` to `path` atomically; False (logged, last good checkpoint kept) when it fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "the last good checkpoint stays" if path.exists() else "no checkpoint yet"
        log.error("could not write the checkpoint %s (%s); %s", path, e.strerror or e, kept)
        return False
    return True


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`; UserError when missing or unreadable."""
    if not path.is_file():
        raise UserError(f"cannot resume: {path} does not exist (start without --resume)")
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # a torn or foreign file: torch raises several kinds
        raise UserError(f"cannot resume from {path}: not a readable checkpoint ({e})") from None
