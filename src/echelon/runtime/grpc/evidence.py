"""A deployed party's audit log, the refusals its guards did not record themselves, and its telemetry log."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from google.protobuf.message import Message

from echelon.audit.anchor import RunBinding, config_digest, deployment_id
from echelon.audit.layout import audit_dir, log_path
from echelon.audit.log import AuditLog
from echelon.config import RunConfig
from echelon.contract.rules import flow_class_name, round_of, tensor_summary
from echelon.contract.slicing import wire_digest
from echelon.errors import UserError
from echelon.runtime.grpc.tls import Credentials
from echelon.v1 import boundary_pb2

log = logging.getLogger("echelon.serve")


def open_audit(run_dir: Path, party: str, creds: Credentials, cfg: RunConfig) -> AuditLog:
    """The party's audit log, bound to the deployment (its CA) and the configuration: continued
    after a restart (a torn last line is cut, and recorded)."""
    audit_dir(run_dir).mkdir(parents=True, exist_ok=True)
    path = log_path(run_dir, party)
    binding = RunBinding(deployment_id(creds.ca), config_digest(cfg))
    if path.exists():
        return AuditLog.open(path, creds.audit_key(), repair=True, binding=binding)
    return AuditLog.create(path, party, creds.audit_key(), "wall", binding, min_quorum=cfg.echelon.min_quorum)


def check_writable(audit: AuditLog) -> None:
    """UserError once `audit` could not be written. Nothing may cross a boundary unrecorded, so
    the party stops (and `echelon launch` restarts it, resumed, up to its restarts) rather than
    stay up refusing every message."""
    if audit.failure is not None:
        raise UserError(
            f"{audit.path} could not be written ({audit.failure}): nothing may cross a boundary "
            "unrecorded, so this party stopped; free space and run it again with --resume"
        )


def log_event(kind: str, fields: dict) -> None:
    """A boundary's or device's telemetry: refusals and SecAgg+ failures go to its log."""
    bad = "refused" in kind or "failure" in kind or "rejected" in kind
    log.log(logging.WARNING if bad else logging.DEBUG, "%s %s", kind, json.dumps(fields, sort_keys=True))


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
            payload_sha256=wire_digest([frame]),
            quorum=quorum,
            provenance=provenance,
            outcome="refused",
            reason=reason,
            peer_seq=None,  # nothing was received, so no chain head is countersigned
            peer_head=None,
        )
    except ValueError as e:  # e.g. a peer that is no party name: the log line is the record
        log.debug("refusal not recorded in the audit log: %s", e)
