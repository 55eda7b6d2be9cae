"""Offline verification of audit logs: one party's log (`verify_log`) or a whole run (`verify_run`).

For every log: each line's hash over its exact bytes, the chain (`seq` consecutive, `prev_hash`
equal to the previous record's hash), the header (format, party, clock, key fingerprint, run id,
configuration digest), every checkpoint's Ed25519 signature over the chain head and the run
binding, the exact field set and types of every record (no extra or list-valued field), and what
each recorded crossing claims against the wire schema and the contract's sender table
(`echelon.audit.schema`). A torn last line and a log without a close checkpoint are violations; a
reopen after a crash is a finding the user must accept.
For a run: the parties against RUN/config.yaml (every one has a log, no other has one, all name
this run and its configuration), the keys against pinned ones (`--keys`), the cross-check of every
link's two ends and of every countersigned chain head (`echelon.audit.crosscheck`), the totals.
"""

from __future__ import annotations

import math
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from echelon.audit.anchor import PINS_FILE, Pins, config_digest, load_pins, parties_of
from echelon.audit.crosscheck import cross_check
from echelon.audit.keys import fingerprint, load_public_key
from echelon.audit.layout import audit_dir, party_of_log, public_key_path
from echelon.audit.record import (
    CLOCKS,
    FIELDS,
    FORMAT,
    GENESIS,
    HEX64,
    INTERRUPTIONS,
    MEMBERSHIP_EVENTS,
    TRIGGERS,
    RecordError,
    checkpoint_message,
    decode,
    decode_signature,
    message_problems,
)
from echelon.audit.report import (
    ACCEPTABLE,
    CONTRACT,
    CRASH,
    EVIDENCE,
    INCOMPLETE,
    INTEGRITY,
    SCHEMA,
    SIGNATURE,
    UNANCHORED,
    AuditReport,
    Finding,
    LogReport,
)
from echelon.audit.schema import FLOW_CLASSES, PROVENANCES, judge_crossing
from echelon.config import load_run
from echelon.errors import UserError

REFUSED = "refused"


class _Scanner:
    """Reads one log line by line into a LogReport."""

    def __init__(self, rep: LogReport, key: Ed25519PublicKey | None) -> None:
        self.rep, self.key = rep, key
        self.signer = rep.party  # the party the checkpoints sign for, from the header once read
        self.prev: str | None = GENESIS  # None after an unreadable line: the next link is unknown
        self.expect = 0
        self.lineno = 0
        self.last_trigger: str | None = None
        self.last_kind: str | None = None
        self.pending = 0  # message records since the last checkpoint that verified
        self.after_close = False
        self.quorum_floor = 1

    def feed(self, line: bytes) -> None:
        self.lineno += 1
        rep = self.rep
        if not line.endswith(b"\n"):
            rep.torn_bytes = len(line)
            rep.flag(
                INCOMPLETE,
                None,
                f"line {self.lineno}: torn last line ({len(line)} bytes without a newline): a write cut "
                "short by a crash, or a truncated log; reopening with repair=True truncates it and "
                "records what it removed",
            )
            return
        try:
            rec = decode(line)
        except RecordError as e:
            rep.flag(INTEGRITY, self.expect, f"line {self.lineno}: {e}")
            self.prev, self.last_kind = None, None
            self.expect += 1
            return
        kind, seq = rec.get("kind"), rec.get("seq")
        fields = FIELDS.get(kind)  # type: ignore[arg-type]
        if fields is None or rec.keys() != fields:
            self._bad_fields(rec, fields)
            return
        if type(seq) is not int or type(rec["prev_hash"]) is not str:
            rep.flag(SCHEMA, self.expect, f"line {self.lineno}: seq or prev_hash has the wrong type", rec)
            self.prev, self.expect, self.last_kind = rec["hash"], self.expect + 1, None
            return
        self._chain(rec, seq)
        self.last_kind = kind
        if kind == "message":
            self._message(rec, seq)
        elif kind == "checkpoint":
            self._checkpoint(rec, seq)
        elif kind == "header":
            self._header(rec, seq)
        elif kind == "handshake":
            self._handshake(rec, seq)
        elif kind == "membership":
            self._membership(rec, seq)
        else:
            self._repair(rec, seq)

    def _bad_fields(self, rec: dict, fields: frozenset[str] | None) -> None:
        if fields is None:
            reason = f"unknown record kind {rec.get('kind')!r}"
        else:
            extra, missing = sorted(rec.keys() - fields), sorted(fields - rec.keys())
            reason = f"{rec['kind']} record with " + ", ".join(
                (
                    [f"undocumented fields {extra} (records carry only their documented fields)"]
                    if extra
                    else []
                )
                + ([f"missing fields {missing}"] if missing else [])
            )
        self.rep.flag(SCHEMA, self.expect, f"line {self.lineno}: {reason}", rec)
        self.prev, self.last_kind = rec["hash"], None
        self.expect += 1

    def _chain(self, rec: dict, seq: int) -> None:
        rep = self.rep
        if seq != self.expect:
            rep.flag(
                INTEGRITY,
                seq,
                f"line {self.lineno}: seq {seq} where {self.expect} was expected "
                "(a record was deleted, inserted or reordered)",
            )
        if self.prev is not None and rec["prev_hash"] != self.prev:
            rep.flag(
                INTEGRITY,
                seq,
                f"line {self.lineno}: prev_hash is not the previous record's hash "
                "(a record was deleted, inserted, reordered or altered)",
            )
        if (self.lineno == 1) != (rec["kind"] == "header"):
            rep.flag(INTEGRITY, seq, f"line {self.lineno}: the header must be the first record and only it")
        self.prev, self.expect = rec["hash"], seq + 1
        rep.last_seq, rep.head = seq, rec["hash"]
        if seq == len(rep.hashes) // 32:  # while consecutive: what countersigned heads are checked against
            rep.hashes += bytes.fromhex(rec["hash"])

    def _header(self, rec: dict, seq: int) -> None:
        rep = self.rep
        problems = []
        if rec["format"] != FORMAT:
            problems.append(f"format {rec['format']!r}, this verifier reads {FORMAT!r}")
        if rec["party"] != rep.party:
            problems.append(f"the header names party {rec['party']!r}, the log file is {rep.party!r}'s")
        if rec["clock"] not in CLOCKS:
            problems.append(f"clock {rec['clock']!r} is not one of {sorted(CLOCKS)}")
        every, quorum = rec["checkpoint_every"], rec["min_quorum"]
        if type(every) is not int or every < 1:
            problems.append(f"checkpoint_every {every!r} is not a positive integer")
        if quorum is not None and (type(quorum) is not int or quorum < 1):
            problems.append(f"min_quorum {quorum!r} is neither null nor a positive integer")
        run_id, config = rec["run_id"], rec["config_sha256"]
        if type(run_id) is not str or not 0 < len(run_id) <= 128:
            problems.append(f"run_id {run_id!r} is not a run id")
        if type(config) is not str or not HEX64.fullmatch(config):
            problems.append("config_sha256 is not a SHA-256")
        if problems:
            rep.flag(INTEGRITY, seq, "header: " + "; ".join(problems), rec)
        if rep.fingerprint is not None and rec["key_fingerprint"] != rep.fingerprint:
            rep.flag(
                SIGNATURE,
                seq,
                f"the log was written with key {rec['key_fingerprint']!r}, the public key given is "
                f"{rep.fingerprint!r}",
                rec,
            )
        self.signer = rec["party"] if type(rec["party"]) is str else rep.party
        rep.clock, rep.min_quorum, rep.checkpoint_every = rec["clock"], quorum, every
        rep.run_id, rep.config_sha256 = run_id, config
        if type(quorum) is int:
            self.quorum_floor = max(1, quorum)

    def _message(self, rec: dict, seq: int) -> None:
        rep = self.rep
        rep.records += 1
        self.pending += 1
        if self.after_close:
            rep.flag(INTEGRITY, seq, "a message recorded after the close checkpoint without a reopen", rec)
        problems = message_problems(rec)
        cls, mtype, prov, peer = rec["flow_class"], rec["message_type"], rec["provenance"], rec["peer"]
        if peer == rep.party:
            problems.append("a party cannot cross a boundary to itself")
        if problems:
            rep.flag(SCHEMA, seq, "; ".join(problems), rec)
            return
        outgoing = rec["direction"] == "out"
        link = (rep.party, peer, rec["channel"]) if outgoing else (peer, rep.party, rec["channel"])
        if rec["outcome"] == REFUSED:  # what was attempted, as the guard saw it: refused, not judged
            rep.refused.append(Finding(rep.party, seq, REFUSED, rec["reason"], rec))
            if not outgoing:
                rep.refused_incoming.setdefault(link, []).append(seq)
            return
        if cls not in FLOW_CLASSES or (prov is not None and prov not in PROVENANCES):
            rep.flag(
                SCHEMA, seq, f"flow class {cls!r} or provenance {prov!r} is not declared in the schema", rec
            )
            return
        verdict = judge_crossing(mtype, cls, prov, link[0])
        wire_bytes, quorum = rec["wire_bytes"], rec["quorum"]
        if verdict.problems or (prov == "BOUNDARY_AGGREGATE" and quorum < self.quorum_floor):
            reasons = list(verdict.problems)
            if prov == "BOUNDARY_AGGREGATE" and quorum < self.quorum_floor:
                reasons.append(
                    f"a boundary aggregate of {quorum} contributors is below the quorum of {self.quorum_floor}"
                )
            rep.flag(CONTRACT, seq, "; ".join(reasons), rec)
        device_bytes = wire_bytes if verdict.per_device else 0
        rep.per_device_bytes += device_bytes
        (rep.sent if outgoing else rep.received).add(cls, mtype, wire_bytes)
        content = (mtype, cls, wire_bytes, rec["payload_sha256"], rec["round_id"], quorum, prov)
        head = None if outgoing else (rec["peer_seq"], rec["peer_head"])
        (rep.outgoing if outgoing else rep.incoming).setdefault(link, []).append(
            (seq, content, device_bytes, head)
        )

    def _checkpoint(self, rec: dict, seq: int) -> None:
        rep = self.rep
        rep.checkpoints += 1
        trigger = rec["trigger"]
        if trigger not in TRIGGERS:
            rep.flag(SCHEMA, seq, f"checkpoint trigger {trigger!r} is not one of {sorted(TRIGGERS)}", rec)
        if trigger == "reopen":
            rep.restarts += 1
            if self.last_trigger not in ("close", "interrupted"):  # stopped without closing: a crash
                rep.crashes += 1
                rep.crash_points.append(seq)
                rep.countersigned_after_restart += self.pending
                rep.reopened_after_crash.append(
                    Finding(
                        rep.party,
                        seq,
                        CRASH,
                        f"the log was reopened at seq {seq} without having been closed: a crash (or a party "
                        "cutting its own log and reopening it); records after its last checkpoint were signed "
                        "only on reopen",
                    )
                )
            self.after_close = False
        elif self.after_close:
            rep.flag(INTEGRITY, seq, "a checkpoint after the close checkpoint without a reopen", rec)
        if trigger in INTERRUPTIONS:
            rep.interruptions.append(seq)
        if self._signature_ok(rec, seq, trigger):
            rep.signed_through = seq
            self.pending = 0
        self.last_trigger = trigger
        self.after_close = self.after_close or trigger in ("close", "interrupted")

    def _signature_ok(self, rec: dict, seq: int, trigger: object) -> bool:
        if self.key is None or type(trigger) is not str or type(rec["signature"]) is not str:
            return False
        try:
            signature = decode_signature(rec["signature"])
            message = checkpoint_message(
                self.signer, seq, trigger, rec["prev_hash"], self.rep.run_id, self.rep.config_sha256
            )
            self.key.verify(signature, message)
        except (RecordError, InvalidSignature):
            self.rep.flag(
                SIGNATURE,
                seq,
                f"checkpoint signature does not verify under {self.signer}'s public key "
                f"({self.rep.fingerprint}): a wrong key, or an altered log",
                rec,
            )
            return False
        return True

    def _handshake(self, rec: dict, seq: int) -> None:
        time, reason = rec["time"], rec["reason"]
        if type(time) not in (int, float) or type(reason) is not str:
            self.rep.flag(SCHEMA, seq, "handshake record without a time and a reason", rec)
            return
        self.rep.refused.append(
            Finding(self.rep.party, seq, REFUSED, f"TLS handshake refused: {reason}", rec)
        )

    def _membership(self, rec: dict, seq: int) -> None:
        device, event, reason = rec["device"], rec["event"], rec["reason"]
        if type(rec["time"]) not in (int, float) or not all(type(v) is str for v in (device, event, reason)):
            self.rep.flag(
                SCHEMA, seq, "membership record without a time, a device, an event and a reason", rec
            )
            return
        if event not in MEMBERSHIP_EVENTS:
            self.rep.flag(
                SCHEMA, seq, f"membership event {event[:64]!r} is not one of {sorted(MEMBERSHIP_EVENTS)}", rec
            )
            return
        if event == "refused":
            self.rep.refused.append(Finding(self.rep.party, seq, REFUSED, f"{device} refused: {reason}", rec))
        else:
            self.rep.membership.append(
                Finding(self.rep.party, seq, event, f"{device} {event}: {reason}", rec)
            )

    def _repair(self, rec: dict, seq: int) -> None:
        removed, digest = rec["removed_bytes"], rec["removed_sha256"]
        if type(removed) is not int or removed < 1 or type(digest) is not str or not HEX64.fullmatch(digest):
            self.rep.flag(
                SCHEMA, seq, "repair record without a byte count and SHA-256 of what it removed", rec
            )
        self.rep.repairs.append({"seq": seq, "removed_bytes": removed, "removed_sha256": digest})

    def finish(self) -> None:
        rep = self.rep
        rep.unsigned = self.pending
        rep.closed = (
            rep.torn_bytes == 0
            and self.last_kind == "checkpoint"
            and self.last_trigger in ("close", "interrupted")
        )
        if rep.last_seq < 0 and rep.torn_bytes == 0:
            rep.flag(INTEGRITY, None, "the log holds no record (not even its header)")
        if not rep.closed:
            rep.crashes += 1
            rep.crash_points.append(math.inf)
            rep.flag(
                INCOMPLETE,
                None,
                f"the log ends at seq {rep.last_seq} without a close checkpoint: the party crashed or the "
                f"log was truncated; {self.pending} message records after the last signed checkpoint "
                f"(seq {rep.signed_through}) are covered by no signature",
            )


def verify_log(path: Path, public_key: Ed25519PublicKey | None, party: str | None = None) -> LogReport:
    """Verify one party's log against its public key (None: signatures cannot be checked).

    `party` defaults to the one the file name gives (`global.jsonl`, `boundary.<id>.jsonl`).
    UserError when the file cannot be read; everything else is a finding in the report.
    """
    path = Path(path)
    rep = LogReport(party or party_of_log(path) or path.stem, path)
    rep.fingerprint = fingerprint(public_key) if public_key is not None else None
    scanner = _Scanner(rep, public_key)
    try:
        with path.open("rb") as f:
            for line in f:
                scanner.feed(line)
    except OSError as e:
        raise UserError(f"cannot read audit log {path}: {e.strerror}") from None
    scanner.finish()
    return rep


def _trusted_keys(adir: Path, keys: Path | None) -> tuple[str, Pins | None, Path]:
    """Where the public keys come from: (description, pins or None, directory of .pub.pem)."""
    if keys is None:
        return "the run directory (not pinned)", None, adir
    if keys.is_file() or (keys / PINS_FILE).is_file():
        pins = load_pins(keys)
        return f"pinned by {pins.path}", pins, adir
    if not keys.is_dir():
        raise UserError(
            f"--keys {keys}: no such file or directory (give the {PINS_FILE} of `echelon certs init`)"
        )
    return f"trusted public keys in {keys}", None, keys


def _expected_parties(run_dir: Path, report: AuditReport) -> tuple[list[str] | None, str | None]:
    """The parties RUN/config.yaml names and its configuration digest (None when unreadable)."""
    from echelon.strategies import effective_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        report.run_violations.append(
            Finding(
                "run",
                None,
                EVIDENCE,
                f"{path} is missing: the parties and the configuration cannot be checked",
            )
        )
        return None, None
    try:
        cfg = effective_config(load_run(path))
    except UserError as e:
        report.run_violations.append(Finding("run", None, EVIDENCE, f"{path} does not load: {e}"))
        return None, None
    return parties_of(cfg), config_digest(cfg)


def _check_binding(report: AuditReport, digest: str | None, pins: Pins | None) -> None:
    """Every log names one run (the pinned deployment's, when pinned) and config.yaml's digest."""
    run_ids = {log.run_id for log in report.logs.values()}
    if len(run_ids) > 1:
        report.run_violations.append(
            Finding(
                "run",
                None,
                EVIDENCE,
                f"the logs name {len(run_ids)} different runs: {sorted(map(str, run_ids))}",
            )
        )
    if pins is not None and pins.deployment is not None and run_ids - {pins.deployment}:
        report.run_violations.append(
            Finding("run", None, EVIDENCE, f"the logs' run is not the pinned deployment {pins.deployment}")
        )
    for party, log in sorted(report.logs.items()):
        if digest is not None and log.config_sha256 != digest:
            report.run_violations.append(
                Finding(
                    party, 0, EVIDENCE, "the log was written for another configuration than RUN/config.yaml"
                )
            )


def verify_run(
    run_dir: Path, key_dir: Path | None = None, accept: frozenset[str] = frozenset()
) -> AuditReport:
    """Verify every log of a run, check the parties and binding against RUN/config.yaml and the
    keys against `key_dir` (a pins file, a directory holding one, or of trusted `<party>.pub.pem`;
    None: the run directory's keys, a finding to accept), cross-check both ends of every link
    and every countersigned head, and total the traffic.

    `accept` names the conditional findings the user accepts (`report.ACCEPTABLE`). UserError
    when `run_dir` is not a run directory with audit logs, or `key_dir` cannot be read.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}")
    unknown = set(accept) - set(ACCEPTABLE)
    if unknown:
        raise ValueError(f"cannot accept {sorted(unknown)}; acceptable: {ACCEPTABLE}")
    adir = audit_dir(run_dir)
    paths = sorted(adir.glob("*.jsonl")) if adir.is_dir() else []
    if not paths:
        raise UserError(
            f"{run_dir} holds no audit logs (expected {adir}/global.jsonl and boundary.<id>.jsonl)"
        )
    anchor, pins, pem_dir = _trusted_keys(adir, key_dir)
    report = AuditReport(run_dir, {}, anchor=anchor, accepted=frozenset(accept))
    if key_dir is None:
        report.unanchored.append(
            Finding(
                "run",
                None,
                UNANCHORED,
                "the public keys were read from the run directory, where whoever rewrites the logs can "
                "replace them: pass --keys with the audit-keys.json of `echelon certs init` (or "
                "--trust-run-keys to accept that the audit then shows only that the logs agree)",
            )
        )
    expected, digest = _expected_parties(run_dir, report)
    for path in paths:
        party = party_of_log(path)
        if party is None:
            report.run_violations.append(
                Finding(path.name, None, EVIDENCE, f"{path.name} is not named like a party's log")
            )
            continue
        if expected is not None and party not in expected:
            report.run_violations.append(
                Finding(party, None, EVIDENCE, f"{path.name} is the log of a party config.yaml does not name")
            )
        try:
            if pins is not None:
                if party not in pins.keys:
                    raise UserError(f"{pins.path} pins no key for {party}")
                key = pins.keys[party]
            else:
                key = load_public_key(public_key_path(pem_dir, party))
        except UserError as e:
            key = None
            report.run_violations.append(Finding(party, None, EVIDENCE, f"{e}: no signature can be verified"))
        report.logs[party] = verify_log(path, key, party)
    for party in expected or []:
        if party not in report.logs:
            report.run_violations.append(
                Finding(
                    party,
                    None,
                    EVIDENCE,
                    f"{party} is a party of config.yaml but has no audit log in this run",
                )
            )
    _check_binding(report, digest, pins)
    result = cross_check(report.logs)
    report.run_violations += result.violations
    report.in_flight = result.in_flight
    report.traffic = result.traffic
    report.per_device_bytes = result.per_device_bytes
    return report
