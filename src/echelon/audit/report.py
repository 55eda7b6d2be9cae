"""What `verify_log` and `verify_run` found: findings, traffic tallies, per-party and run reports.

All byte counts are exact wire bytes (the serialized envelope frames of a message); all times are
driver clock seconds as recorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Finding categories. "incomplete" (a torn tail, a log that never closed) is crash evidence rather
# than tampering, but the audit still fails: the evidence is not whole.
INTEGRITY = "integrity"  # a hash, chain, sequence or header problem: the log was altered
SIGNATURE = "signature"  # a checkpoint signature that does not verify under the party's key
SCHEMA = "schema"  # a record with unknown, missing, list-valued or ill-typed fields
CONTRACT = "contract"  # a recorded crossing the information-flow contract forbids
CROSSCHECK = "crosscheck"  # the two ends of a link disagree
EVIDENCE = "evidence"  # a log, key or config the audit needs is missing, or names another run
INCOMPLETE = "incomplete"
COUNTERSIGN = "countersign"  # a peer countersigned a chain head this log no longer holds
# Findings that fail the audit unless the user accepts them (`echelon audit --accept-...`).
IN_FLIGHT = "in_flight"  # a message one end recorded and the other did not, at a crash
CRASH = "crash"  # a party stopped without closing its log and reopened it
UNANCHORED = "unanchored"  # the public keys came from the run directory, not from pinned keys
ACCEPTABLE = (IN_FLIGHT, CRASH, UNANCHORED)


@dataclass(frozen=True)
class Finding:
    """One record (or log, when `seq` is None) of `party`, and what is wrong with it or notable about it."""

    party: str
    seq: int | None
    category: str
    reason: str
    record: dict | None = None

    def to_json(self) -> dict:
        return {
            "party": self.party,
            "seq": self.seq,
            "category": self.category,
            "reason": self.reason,
            "record": self.record,
        }


@dataclass
class Tally:
    """Messages and wire bytes by (flow class, message type)."""

    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    bytes: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, flow_class: str, message_type: str, wire_bytes: int) -> None:
        self.messages[flow_class, message_type] += 1
        self.bytes[flow_class, message_type] += wire_bytes

    def merge(self, other: Tally) -> None:
        self.messages.update(other.messages)
        self.bytes.update(other.bytes)

    @property
    def total_messages(self) -> int:
        return sum(self.messages.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def by_class(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (cls, _), n in sorted(self.messages.items()):
            entry = out.setdefault(cls, {"messages": 0, "bytes": 0})
            entry["messages"] += n
            entry["bytes"] += self.bytes[cls, _]
        return out

    def to_json(self) -> dict:
        return {
            "messages": self.total_messages,
            "bytes": self.total_bytes,
            "by_flow_class": self.by_class(),
            "by_type": {
                t: {"flow_class": c, "messages": n, "bytes": self.bytes[c, t]}
                for (c, t), n in sorted(self.messages.items(), key=lambda kv: kv[0][1])
            },
        }


# One crossing as the verifier keeps it for the cross-check: (seq, content, per-device bytes, and
# for a received one the sender's chain head it countersigned: (peer_seq, peer_head) or None).
# The content is every recorded field derived from the wire bytes: both ends must record it alike.
Content = tuple[str, str, int, str, int, int, str | None]
Crossing = tuple[int, Content, int, tuple[int, str] | None]
CONTENT_FIELDS = (
    "message_type",
    "flow_class",
    "wire_bytes",
    "payload_sha256",
    "round_id",
    "quorum",
    "provenance",
)
# A directed link: (sender party, receiver party, channel).
Link = tuple[str, str, str]


@dataclass
class LogReport:
    """One party's log: its integrity, signature coverage, schema and contract findings and traffic."""

    party: str
    path: Path
    fingerprint: str | None = None  # of the key the log was checked against
    run_id: str | None = None
    config_sha256: str | None = None
    clock: str | None = None
    min_quorum: int | None = None
    checkpoint_every: int | None = None
    records: int = 0  # message records (attempts), excluding header, checkpoints and repairs
    checkpoints: int = 0
    last_seq: int = -1
    head: str | None = None  # hash of the last complete record
    signed_through: int = -1  # seq of the last checkpoint whose signature verifies
    unsigned: int = 0  # message records after it: authenticated by no signature
    countersigned_after_restart: int = 0  # records signed only by the checkpoint written on reopen
    restarts: int = 0
    crashes: int = 0
    repairs: list[dict] = field(default_factory=list)
    closed: bool = False
    torn_bytes: int = 0
    violations: list[Finding] = field(default_factory=list)
    refused: list[Finding] = field(default_factory=list)
    # A boundary's admissions and departures of devices (category "admitted" or "departed").
    membership: list[Finding] = field(default_factory=list)
    sent: Tally = field(default_factory=Tally)
    received: Tally = field(default_factory=Tally)
    per_device_bytes: int = 0
    # For the cross-check: what this party sent and received, per directed link, in log order.
    outgoing: dict[Link, list[Crossing]] = field(default_factory=dict)
    incoming: dict[Link, list[Crossing]] = field(default_factory=dict)
    refused_incoming: dict[Link, list[int]] = field(default_factory=dict)
    # Seqs at which the party crashed (a reopen after no close, a repair; inf: the log never closed).
    crash_points: list[float] = field(default_factory=list)
    # Seqs of "disconnect" and "interrupted" checkpoints: messages may have been lost in flight there.
    interruptions: list[float] = field(default_factory=list)
    reopened_after_crash: list[Finding] = field(default_factory=list)
    # The hash of every record by seq (32 bytes each), while the chain is intact: what a peer's
    # countersigned head is checked against.
    hashes: bytearray = field(default_factory=bytearray)

    def hash_at(self, seq: int) -> str | None:
        """The hash of record `seq`, or None when the log holds no such (intact) record."""
        if not 0 <= seq < len(self.hashes) // 32:
            return None
        return self.hashes[32 * seq : 32 * seq + 32].hex()

    def flag(self, category: str, seq: int | None, reason: str, record: dict | None = None) -> None:
        self.violations.append(Finding(self.party, seq, category, reason, record))

    def categories(self) -> Counter[str]:
        return Counter(v.category for v in self.violations)

    @property
    def chain_ok(self) -> bool:
        return not any(v.category in (INTEGRITY, SCHEMA) for v in self.violations)

    @property
    def signatures_ok(self) -> bool:
        return self.unsigned == 0 and not any(v.category == SIGNATURE for v in self.violations)

    def to_json(self) -> dict:
        return {
            "log": str(self.path),
            "key_fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "config_sha256": self.config_sha256,
            "clock": self.clock,
            "min_quorum": self.min_quorum,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_seq": self.last_seq,
            "chain_ok": self.chain_ok,
            "signatures_ok": self.signatures_ok,
            "signed_through_seq": self.signed_through,
            "unsigned_records": self.unsigned,
            "countersigned_after_restart": self.countersigned_after_restart,
            "restarts": self.restarts,
            "crashes": self.crashes,
            "repairs": self.repairs,
            "closed": self.closed,
            "torn_tail_bytes": self.torn_bytes,
            "per_device_payload_bytes": self.per_device_bytes,
            "sent": self.sent.to_json(),
            "received": self.received.to_json(),
            "refused": len(self.refused),
            "membership": [m.to_json() for m in self.membership],
            "violations": len(self.violations),
        }


@dataclass
class AuditReport:
    """A run's audit: every party's log, the cross-check of their links, and the totals.

    `traffic` counts each crossing once (by its sender's record, or by its receiver's when the
    sender recorded none). `ok` holds only when there is no violation, no per-device byte, and
    no finding of an acceptable kind (in flight at a crash, a reopen after a crash, keys that
    are not pinned) that the user did not accept (`accepted`).
    """

    run_dir: Path
    logs: dict[str, LogReport]
    run_violations: list[Finding] = field(default_factory=list)
    in_flight: list[Finding] = field(default_factory=list)
    traffic: Tally = field(default_factory=Tally)
    per_device_bytes: int = 0
    anchor: str = "the run directory"  # where the public keys came from
    unanchored: list[Finding] = field(default_factory=list)
    accepted: frozenset[str] = frozenset()

    @property
    def crashes(self) -> list[Finding]:
        return [c for log in self.logs.values() for c in log.reopened_after_crash]

    @property
    def conditional(self) -> list[Finding]:
        """Findings of the kinds a user may accept: in flight, crashes, unpinned keys."""
        return self.in_flight + self.crashes + self.unanchored

    @property
    def failures(self) -> list[Finding]:
        """Violations, and the conditional findings the user did not accept."""
        return self.violations + [f for f in self.conditional if f.category not in self.accepted]

    @property
    def violations(self) -> list[Finding]:
        return [v for log in self.logs.values() for v in log.violations] + self.run_violations

    @property
    def refused(self) -> list[Finding]:
        return [r for log in self.logs.values() for r in log.refused]

    @property
    def ok(self) -> bool:
        return not self.failures and self.per_device_bytes == 0

    def to_json(self) -> dict:
        violations = self.violations
        return {
            "run": str(self.run_dir),
            "ok": self.ok,
            "keys_from": self.anchor,
            "accepted": sorted(self.accepted),
            "failures": [f.to_json() for f in self.failures],
            "crashes": [f.to_json() for f in self.crashes],
            "unanchored": [f.to_json() for f in self.unanchored],
            "per_device_payload_bytes": self.per_device_bytes,
            "violation_count": len(violations),
            "violations_by_category": dict(sorted(Counter(v.category for v in violations).items())),
            "violations": [v.to_json() for v in violations],
            "refused": [r.to_json() for r in self.refused],
            "in_flight": [f.to_json() for f in self.in_flight],
            "traffic": self.traffic.to_json(),
            "parties": {p: log.to_json() for p, log in sorted(self.logs.items())},
        }
