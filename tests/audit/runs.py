"""Audit logs of small runs, written by `AuditLog` from real serialized cross-boundary envelopes.

Each run directory also holds the config.yaml its parties were bound to (two boundaries, b0 and
b1, with the small test run's settings), and every receipt keeps the sender's chain head.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import Message

from echelon.audit.anchor import RunBinding, config_digest, write_pins
from echelon.audit.layout import log_path
from echelon.audit.log import AuditLog
from echelon.config import RunConfig
from echelon.contract.rules import flow_class_name, round_of, tensor_summary
from echelon.strategies import effective_config
from echelon.v1 import boundary_pb2, tensor_pb2
from tests.helpers import small_run

GLOBAL = "global"
CONFIG = RunConfig.model_validate(small_run())
BINDING = RunBinding("0123456789abcdef0123456789abcdef", config_digest(effective_config(CONFIG)))


def tensor(values: np.ndarray, provenance: int, contributors: int) -> tensor_pb2.TensorPayload:
    data = values.astype("<f4").tobytes()
    return tensor_pb2.TensorPayload(
        provenance=provenance,
        contributors=contributors,
        dtype=tensor_pb2.FLOAT32,
        numel=values.size,
        data=data,
    )


def fields(
    now: float,
    sender: str,
    receiver: str,
    direction: str,
    body: Message,
    boundary_id: str,
    head: tuple[int, str] | None = None,
) -> dict:
    """The fields a guard records for `body` crossing from `sender` to `receiver` (a receipt
    keeps the sender's chain head `head`)."""
    envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id=boundary_id)
    field = next(
        f.name for f in envelope.DESCRIPTOR.oneofs_by_name["body"].fields if f.message_type == body.DESCRIPTOR
    )
    getattr(envelope, field).CopyFrom(body)
    wire = envelope.SerializeToString()
    provenance, quorum = tensor_summary(body)
    return dict(
        time=now,
        channel=f"{sender}<->{receiver}",
        direction=direction,
        peer=receiver if direction == "out" else sender,
        message_type=body.DESCRIPTOR.full_name,
        flow_class=flow_class_name(body.DESCRIPTOR),
        wire_bytes=len(wire),
        round_id=round_of(body),
        payload_sha256=hashlib.sha256(wire).hexdigest(),
        quorum=quorum,
        provenance=provenance,
        outcome="sent" if direction == "out" else "received",
        reason=None,
        peer_seq=None if direction == "out" else head[0],
        peer_head=None if direction == "out" else head[1],
    )


def cross(logs: dict[str, AuditLog], now: float, sender: str, receiver: str, body: Message) -> None:
    """Record `body` as sent by `sender` and received by `receiver`."""
    boundary = (sender if sender != GLOBAL else receiver).removeprefix("boundary.")
    head = logs[sender].head()
    logs[sender].append(**fields(now, sender, receiver, "out", body, boundary))
    logs[receiver].append(**fields(now + 0.01, sender, receiver, "in", body, boundary, head))


def training_messages(boundary: str, step: int, rng: np.random.Generator) -> list[tuple[str, str, Message]]:
    """One outer step of `boundary` with the global plane: (sender, receiver, body) in order."""
    return [
        (
            boundary,
            GLOBAL,
            boundary_pb2.BoundaryStatus(middle_step=step, drift=0.1 * step, tokens=64, contributors=2),
        ),
        (GLOBAL, boundary, boundary_pb2.SyncRequest(outer_step=step)),
        (
            boundary,
            GLOBAL,
            boundary_pb2.BoundaryDelta(
                outer_step=step,
                tokens=128,
                middle_step=step,
                delta=tensor(rng.standard_normal(16), tensor_pb2.BOUNDARY_AGGREGATE, 2),
            ),
        ),
        (
            GLOBAL,
            boundary,
            boundary_pb2.GlobalReference(
                outer_step=step, parameters=tensor(rng.standard_normal(16), tensor_pb2.GLOBAL, 0)
            ),
        ),
    ]


def open_logs(
    run: Path, keys: dict[str, Ed25519PrivateKey], every: int = 1000, binding: RunBinding = BINDING
) -> dict[str, AuditLog]:
    (run / "audit").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG.model_dump(mode="json")))
    return {
        p: AuditLog.create(log_path(run, p), p, key, "virtual", binding, min_quorum=2, checkpoint_every=every)
        for p, key in keys.items()
    }


def write_run(
    run: Path,
    keys: dict[str, Ed25519PrivateKey],
    steps: int = 3,
    every: int = 1000,
    close: bool = True,
    binding: RunBinding = BINDING,
) -> dict[str, AuditLog]:
    """A clean run of `steps` outer steps between the global plane and every boundary in `keys`."""
    logs = open_logs(run, keys, every, binding)
    rng = np.random.default_rng(0)
    for step in range(1, steps + 1):
        for boundary in sorted(p for p in keys if p != GLOBAL):
            for sender, receiver, body in training_messages(boundary, step, rng):
                cross(logs, float(step), sender, receiver, body)
    if close:
        for log in logs.values():
            log.close()
    return logs


def pin(path: Path, keys: dict[str, Ed25519PrivateKey], deployment: str | None = None) -> Path:
    """Pinned public keys of `keys` at `path` (as `echelon certs init` writes them)."""
    write_pins(path, {p: k.public_key() for p, k in keys.items()}, deployment or BINDING.run_id)
    return path
