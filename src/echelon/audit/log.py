"""The append-only audit log one party (the global plane, or one boundary) writes.

    log = AuditLog.create(log_path(run, "boundary.b0"), "boundary.b0", key, "virtual", binding)
    record = log.append(time=..., channel=..., ...)   # one call per cross-boundary attempt
    seq, head = log.head()                            # what the party's next message carries
    log.checkpoint()                                  # at the run's own checkpoints (optional)
    log.close()                                       # signs the head; or use `with`
    log = AuditLog.open(path, key)                    # continue after a restart

Durability: each record is one `write` of one whole line straight to the kernel (no user-space
buffer), so a process crash loses nothing that `append` returned. A record of a sent message is
also synced to disk before `append` returns (before the message leaves): its peer countersigns
the chain head the message carries, so no crash may lose what the peer holds evidence of. Every
`checkpoint_every` records, at `checkpoint()` and at `close()`, the log appends a checkpoint (an
Ed25519 signature over the chain head) and fsyncs; a machine crash can lose at most the receipts
and refusals since the last sync, and those carry no signature yet, which the verifier reports.
Signing every record instead would cost an Ed25519 signature per record to write and a
verification per record to audit (the benchmark measures both).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from pathlib import Path
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.anchor import RunBinding
from echelon.audit.keys import fingerprint, write_public_key
from echelon.audit.layout import LOG_SUFFIX, check_party, party_of_log, public_key_path
from echelon.audit.record import (
    CLOCKS,
    FORMAT,
    GENESIS,
    MAX_NAME,
    MAX_REASON,
    MEMBERSHIP_EVENTS,
    MESSAGE_FIELDS,
    checkpoint_message,
    encode,
    encode_signature,
    message_problems,
)
from echelon.audit.report import INTEGRITY, SCHEMA, SIGNATURE
from echelon.audit.verify import verify_log
from echelon.errors import UserError

DEFAULT_CHECKPOINT_EVERY = 1000
_FIELDS = frozenset(MESSAGE_FIELDS)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path} is being written by another process") from None


def _checkpoint_record(
    key: Ed25519PrivateKey, party: str, binding: RunBinding, seq: int, trigger: str, head: str
) -> dict:
    signature = key.sign(checkpoint_message(party, seq, trigger, head, binding.run_id, binding.config_sha256))
    return {
        "kind": "checkpoint",
        "seq": seq,
        "trigger": trigger,
        "signature": encode_signature(signature),
        "prev_hash": head,
    }


class AuditLog:
    """One party's hash-chained, checkpoint-signed JSONL log; build with `create` or `open`.

    Thread-safe. Not to be shared between processes (an exclusive lock enforces it).
    """

    def __init__(
        self,
        path: Path,
        party: str,
        key: Ed25519PrivateKey,
        binding: RunBinding,
        fd: int,
        seq: int,
        head: str,
        every: int,
    ) -> None:
        self.path, self.party, self.binding, self.checkpoint_every = path, party, binding, every
        self._key, self._fd, self._seq, self._head = key, fd, seq, head
        self._since_checkpoint = 0
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._countersigned: dict[str, set[int]] = {}  # peer -> the seqs of its heads countersigned

    @classmethod
    def create(
        cls,
        path: Path,
        party: str,
        signing_key: Ed25519PrivateKey,
        clock: str,
        binding: RunBinding,
        *,
        min_quorum: int | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> AuditLog:
        """Start `path` (named `<party>.jsonl`) with its header and a signed checkpoint.

        `clock` says what the records' `time` is: "virtual" (simulation) or "wall" (deployment)
        seconds. `min_quorum`, when given, lets the verifier check every boundary aggregate's
        contributor count against it. `binding` (run id, configuration digest) goes into the
        header and every checkpoint signature. Publishes the public key as `<party>.pub.pem`
        beside the log. UserError when the log exists (continue it with `open`).
        """
        path = Path(path)
        check_party(party)
        if path.name != f"{party}{LOG_SUFFIX}":
            raise ValueError(f"{party}'s log must be named {party}{LOG_SUFFIX}, not {path.name}")
        if clock not in CLOCKS:
            raise ValueError(f"clock {clock!r} is not one of {sorted(CLOCKS)}")
        if checkpoint_every < 1 or (min_quorum is not None and min_quorum < 1):
            raise ValueError("checkpoint_every and min_quorum must be positive")
        if path.exists():
            raise UserError(f"audit log {path} already exists; AuditLog.open continues it")
        public = signing_key.public_key()
        write_public_key(public_key_path(path.parent, party), public)
        header = {
            "kind": "header",
            "seq": 0,
            "format": FORMAT,
            "party": party,
            "clock": clock,
            "key_fingerprint": fingerprint(public),
            "checkpoint_every": checkpoint_every,
            "min_quorum": min_quorum,
            "run_id": binding.run_id,
            "config_sha256": binding.config_sha256,
            "prev_hash": GENESIS,
        }
        first, head = encode(header)
        second, head = encode(_checkpoint_record(signing_key, party, binding, 1, "open", head))
        # The log appears whole (header and first checkpoint, synced) or not at all.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, first + second)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise UserError(f"audit log {path} already exists; AuditLog.open continues it") from None
        finally:
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        _lock(fd, path)
        return cls(path, party, signing_key, binding, fd, 2, head, checkpoint_every)

    @classmethod
    def open(
        cls,
        path: Path,
        signing_key: Ed25519PrivateKey,
        *,
        repair: bool = False,
        binding: RunBinding | None = None,
    ) -> AuditLog:
        """Continue an existing log after a restart, once it verifies under `signing_key` (and
        belongs to the run `binding` names, when given).

        The whole log is verified first (chain, signatures, record fields). A torn last line (a
        write cut short by a crash) is refused unless `repair`: then it is truncated and a repair
        record keeps its size and SHA-256. A signed "reopen" checkpoint follows, which also
        covers records a crash left unsigned (the verifier reports how many). UserError when the
        log is missing, in use, altered, written with another key, or torn without `repair`.
        """
        path = Path(path)
        party = party_of_log(path)
        if party is None:
            raise UserError(f"{path} is not named like an audit log (<party>{LOG_SUFFIX})")
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
        except OSError as e:
            raise UserError(f"cannot open audit log {path}: {e.strerror}") from None
        _lock(fd, path)
        try:
            rep = verify_log(path, signing_key.public_key(), party)
            altered = [v for v in rep.violations if v.category in (INTEGRITY, SIGNATURE, SCHEMA)]
            if altered:
                lines = "\n".join(f"  seq {v.seq}: {v.reason}" for v in altered[:10])
                raise UserError(f"{path} does not verify; refusing to continue it:\n{lines}")
            if binding is not None and (rep.run_id, rep.config_sha256) != (
                binding.run_id,
                binding.config_sha256,
            ):
                raise UserError(
                    f"{path} belongs to run {rep.run_id} (configuration {rep.config_sha256}), not to "
                    f"{binding.run_id} ({binding.config_sha256}); refusing to continue it"
                )
            if rep.torn_bytes and not repair:
                raise UserError(
                    f"{path} ends with a torn record ({rep.torn_bytes} bytes); reopen with repair=True to "
                    "truncate it (the log records what was removed)"
                )
            log = cls(
                path,
                party,
                signing_key,
                RunBinding(rep.run_id, rep.config_sha256),
                fd,
                rep.last_seq + 1,
                rep.head or GENESIS,
                rep.checkpoint_every or 1,
            )
            for (sender, receiver, _), crossings in rep.incoming.items():
                if receiver == party:
                    heads = log._countersigned.setdefault(sender, set())
                    heads.update(head[0] for *_, head in crossings if head is not None)
            if rep.torn_bytes:
                log._truncate_torn(rep.torn_bytes)
            log._checkpoint("reopen")
        except BaseException:
            os.close(fd)
            raise
        return log

    def _truncate_torn(self, torn: int) -> None:
        size = os.fstat(self._fd).st_size
        removed = os.pread(self._fd, torn, size - torn)
        os.ftruncate(self._fd, size - torn)
        os.fsync(self._fd)
        self._write(
            {
                "kind": "repair",
                "seq": self._seq,
                "removed_bytes": torn,
                "removed_sha256": hashlib.sha256(removed).hexdigest(),
                "prev_hash": self._head,
            }
        )

    def _write(self, record: dict) -> str:
        if self._broken is not None:
            raise OSError(f"audit log {self.path} failed earlier ({self._broken}); reopen it to continue")
        line, digest = encode(record)
        try:
            _write_all(self._fd, line)
        except OSError as e:
            self._broken = str(e)  # a partial line may be on disk: the verifier and open() see it torn
            raise
        self._seq += 1
        self._head = digest
        return digest

    def _checkpoint(self, trigger: str) -> None:
        self._write(_checkpoint_record(self._key, self.party, self.binding, self._seq, trigger, self._head))
        os.fsync(self._fd)
        self._since_checkpoint = 0

    def append(self, **fields: object) -> dict:
        """Record one cross-boundary message attempt; returns the record as written (with its hash).

        Takes exactly the fields of `echelon.audit.record.MESSAGE_FIELDS`. The record is in the
        kernel when this returns. TypeError on other fields, ValueError on ill-typed values (a
        list of members, a negative count, a bad hash) or a closed log; OSError when writing fails.
        """
        if fields.keys() != _FIELDS:
            missing, extra = sorted(_FIELDS - fields.keys()), sorted(fields.keys() - _FIELDS)
            raise TypeError(f"append: missing fields {missing}, unexpected fields {extra}")
        reason = fields["reason"]
        if isinstance(reason, str) and len(reason) > MAX_REASON:
            keep = MAX_REASON - 48  # room for the marker
            fields["reason"] = f"{reason[:keep]} [{len(reason) - keep} more characters cut]"
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"audit log {self.path} is closed")
            record = {"kind": "message", "seq": self._seq, **fields, "prev_hash": self._head}
            problems = message_problems(record)
            if fields["peer"] == self.party:
                problems.append("a party cannot cross a boundary to itself")
            if problems:
                raise ValueError(f"audit record refused: {'; '.join(problems)}")
            record["hash"] = self._write(record)
            peer, seq = str(fields["peer"]), fields["peer_seq"]
            if isinstance(seq, int):  # a received message: its sender's head, countersigned
                self._countersigned.setdefault(peer, set()).add(seq)
            if fields["outcome"] == "sent":
                os.fdatasync(self._fd)  # durable before it leaves: the peer will countersign it
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                self._checkpoint("interval")
        return record

    def handshake_refused(self, time: float, reason: str) -> dict:
        """Record a TLS handshake this party's server refused (no party was named, nothing
        crossed); returns the record as written. ValueError on a closed log."""
        if len(reason) > MAX_REASON:
            reason = f"{reason[: MAX_REASON - 48]} [{len(reason) - MAX_REASON + 48} more characters cut]"
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"audit log {self.path} is closed")
            record = {"kind": "handshake", "seq": self._seq, "time": float(time), "reason": reason}
            record["prev_hash"] = self._head
            record["hash"] = self._write(record)
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                self._checkpoint("interval")
        return record

    def membership(self, time: float, device: str, event: str, reason: str) -> dict:
        """Record a boundary's decision about `device` (a party name): `event` is "admitted",
        "departed" or "refused", `reason` says why; returns the record as written. ValueError on
        an unknown event or a closed log."""
        if event not in MEMBERSHIP_EVENTS:
            raise ValueError(f"membership event {event!r} is not one of {sorted(MEMBERSHIP_EVENTS)}")
        record = {"kind": "membership", "seq": 0, "time": float(time), "device": device[:MAX_NAME]}
        record |= {"event": event, "reason": reason[:MAX_REASON]}
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"audit log {self.path} is closed")
            record["seq"], record["prev_hash"] = self._seq, self._head
            record["hash"] = self._write(record)
            os.fdatasync(self._fd)  # a membership decision is durable before it takes effect
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.checkpoint_every:
                self._checkpoint("interval")
        return record

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last record written: the chain head the party's next message
        carries, for its peer to countersign."""
        with self._lock:
            return self._seq - 1, self._head

    @property
    def failure(self) -> str | None:
        """Why the log can no longer be written (a write failed: a full disk, an I/O error), or None."""
        return self._broken

    def countersigned(self, peer: str, seq: int) -> bool:
        """Whether this log countersigned `peer`'s chain head at `seq` already, across restarts:
        a message carrying it again is a replay."""
        with self._lock:
            return seq in self._countersigned.get(peer, ())

    def checkpoint(self, trigger: str = "explicit") -> None:
        """Sign the current head and fsync: everything recorded so far is durable and authenticated.

        `trigger` "disconnect" also marks that a stream to a peer ended here, so messages on it may
        have been lost in flight (the verifier reports them as such, not as violations)."""
        if trigger not in ("explicit", "disconnect"):
            raise ValueError(f"checkpoint trigger {trigger!r} is not explicit or disconnect")
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"audit log {self.path} is closed")
            self._checkpoint(trigger)

    def close(self, trigger: str = "close") -> None:
        """Sign the head with a close checkpoint, fsync and release the log. Idempotent.

        `trigger` "interrupted": the party was stopped before the run ended (messages may be in
        flight); "close": it ended with the run."""
        if trigger not in ("close", "interrupted"):
            raise ValueError(f"close trigger {trigger!r} is not close or interrupted")
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self._broken is None:
                    self._checkpoint(trigger)
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
