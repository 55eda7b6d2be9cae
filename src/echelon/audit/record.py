"""The audit record format: one JSON object per line, hash-chained, with signed checkpoints.

Each line is the canonical JSON C(r) of a record r without its `hash` (keys sorted, no
whitespace, ASCII only), with `,"hash":"<hex>"` inserted before the closing brace, where
hash = SHA-256(C(r)). Every record names the `hash` of the record before it in `prev_hash`; the
first record (the header, seq 0) chains to GENESIS. So the verifier hashes the exact bytes of a
line (no re-encoding) and any change to any byte of any line breaks the chain.

Record kinds, by their exact field sets (no other field is allowed, see `FIELDS`):
- header (seq 0): the party, the format version, the clock, the public key fingerprint, the run
  id and the configuration digest (`echelon.audit.anchor.RunBinding`);
- message: one cross-boundary message attempt (see `MESSAGE_FIELDS`); a received one also keeps
  the sender's chain head the message carried (`peer_seq`, `peer_head`), countersigning it;
- checkpoint: an Ed25519 signature over the chain head (the `prev_hash` it carries), the party,
  the run id and the configuration digest, which authenticates every record before it through
  the chain;
- repair: a torn tail was truncated on reopen; its size and SHA-256 are kept.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re

FORMAT = "echelon-audit/3"  # 3: payload_sha256 is a WireDigest (echelon.contract.slicing)
GENESIS = "0" * 64

# Fields a caller passes to `AuditLog.append`; the log adds kind, seq, prev_hash and hash.
MESSAGE_FIELDS = (
    "time",
    "channel",
    "direction",
    "peer",
    "message_type",
    "flow_class",
    "wire_bytes",
    "round_id",
    "payload_sha256",
    "quorum",
    "provenance",
    "outcome",
    "reason",
    "peer_seq",
    "peer_head",
)
CHAINED = ("kind", "seq", "prev_hash", "hash")
FIELDS: dict[str, frozenset[str]] = {
    "header": frozenset(
        (
            *CHAINED,
            "format",
            "party",
            "clock",
            "key_fingerprint",
            "checkpoint_every",
            "min_quorum",
            "run_id",
            "config_sha256",
        )
    ),
    "message": frozenset((*CHAINED, *MESSAGE_FIELDS)),
    "checkpoint": frozenset((*CHAINED, "trigger", "signature")),
    "repair": frozenset((*CHAINED, "removed_bytes", "removed_sha256")),
    # A TLS handshake the party's server refused (plaintext, another CA, no certificate): the peer
    # named no party, so there is no channel, only the time and gRPC core's reason.
    "handshake": frozenset((*CHAINED, "time", "reason")),
    # A boundary's decision about a device's membership (nothing crosses): a device outside the
    # initial membership admitted by its certificate, a device that left for good, or a device
    # refused (an unknown or departed device, a certificate of another boundary).
    "membership": frozenset((*CHAINED, "time", "device", "event", "reason")),
}
MEMBERSHIP_EVENTS = frozenset({"admitted", "departed", "refused"})
CLOCKS = frozenset({"virtual", "wall"})
TRIGGERS = frozenset({"open", "interval", "explicit", "close", "reopen", "disconnect", "interrupted"})
# Checkpoints that mark where messages may have been lost in flight without a crash: a stream
# to a peer ended ("disconnect"), or the party was stopped before the run ended ("interrupted",
# which also closes the log).
INTERRUPTIONS = frozenset({"disconnect", "interrupted"})
# (direction, outcome) pairs a message record may carry.
OUTCOMES = frozenset({("out", "sent"), ("out", "refused"), ("in", "received"), ("in", "refused")})
PARTY = re.compile(r"global|boundary\.[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_NAME = 256  # longest channel, type, class or provenance name
MAX_REASON = 4096  # longest refusal reason; the writer shortens longer ones, saying so

_DECODER = json.JSONDecoder()
_SUFFIX_HEAD = b',"hash":"'
_SUFFIX_LEN = len(_SUFFIX_HEAD) + 64 + len(b'"}\n')


class RecordError(ValueError):
    """A line that is not a well-formed, self-consistent audit record."""


def canonical(obj: dict) -> bytes:
    """C(obj): sorted keys, no whitespace, ASCII only, no NaN or infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def encode(record: dict) -> tuple[bytes, str]:
    """The line (newline included) for `record` (which has no `hash` yet) and its hash."""
    body = canonical(record)
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + _SUFFIX_HEAD + digest.encode() + b'"}\n', digest


def decode(line: bytes) -> dict:
    """The record a complete line (ending in a newline) holds, its `hash` verified.

    RecordError when the line is malformed or its hash does not match its bytes.
    """
    if len(line) <= _SUFFIX_LEN or line[-_SUFFIX_LEN : -_SUFFIX_LEN + len(_SUFFIX_HEAD)] != _SUFFIX_HEAD:
        raise RecordError("not an audit record line (no trailing hash)")
    if line[-3:] != b'"}\n':
        raise RecordError("not an audit record line (bad ending)")
    body = line[:-_SUFFIX_LEN] + b"}"
    stated = line[-_SUFFIX_LEN + len(_SUFFIX_HEAD) : -3]
    if hashlib.sha256(body).hexdigest().encode() != stated:
        raise RecordError("hash does not match the record's bytes (the record was modified)")
    try:
        record = _DECODER.decode(body.decode("ascii"))
    except ValueError as e:
        raise RecordError(f"not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RecordError("not a JSON object")
    record["hash"] = stated.decode()
    return record


def checkpoint_message(
    party: str, seq: int, trigger: str, prev_hash: str, run_id: object, config_sha256: object
) -> bytes:
    """The bytes a checkpoint's Ed25519 signature covers: everything in it but the signature,
    and the run id and configuration digest of the log's header."""
    fields = {
        "party": party,
        "seq": seq,
        "trigger": trigger,
        "prev_hash": prev_hash,
        "run_id": run_id,
        "config_sha256": config_sha256,
    }
    return FORMAT.encode() + b" checkpoint\n" + canonical(fields)


def encode_signature(signature: bytes) -> str:
    return base64.b64encode(signature).decode()


def decode_signature(text: str) -> bytes:
    """The 64 signature bytes; RecordError when `text` is not their base64."""
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise RecordError("signature is not 64 bytes of base64")
    return raw


_NUMBER = (int, float)


def _is_int(v: object) -> bool:
    return type(v) is int and v >= 0


def _is_text(v: object, limit: int = MAX_NAME) -> bool:
    return type(v) is str and 0 < len(v) <= limit


def _sound(r: dict) -> bool:
    """True when `message_problems(r)` would find nothing: the common case, checked fast."""
    t, prov, reason, direction, outcome = (
        r["time"],
        r["provenance"],
        r["reason"],
        r["direction"],
        r["outcome"],
    )
    sha, peer = r["payload_sha256"], r["peer"]
    peer_seq, peer_head = r["peer_seq"], r["peer_head"]
    return (
        type(t) in _NUMBER
        and 0 <= t < math.inf
        and _is_text(r["channel"])
        and _is_text(r["message_type"])
        and _is_text(r["flow_class"])
        and type(peer) is str
        and PARTY.fullmatch(peer) is not None
        and _is_int(r["wire_bytes"])
        and _is_int(r["round_id"])
        and _is_int(r["quorum"])
        and type(sha) is str
        and HEX64.fullmatch(sha) is not None
        and (prov is None or _is_text(prov))
        and type(direction) is str
        and type(outcome) is str
        and (direction, outcome) in OUTCOMES
        and (_is_text(reason, MAX_REASON) if outcome == "refused" else reason is None)
        and (
            (peer_seq is None and peer_head is None)
            if outcome != "received"
            else (_is_int(peer_seq) and type(peer_head) is str and HEX64.fullmatch(peer_head) is not None)
        )
    )


def message_problems(r: dict) -> list[str]:
    """Structural problems of a message record's caller fields (types and ranges; empty when sound).

    `r` holds every field of MESSAGE_FIELDS. What the fields claim about the contract (may this
    type cross?) is for the verifier to judge.
    """
    if _sound(r):
        return []
    out = []
    nested = sorted(k for k, v in r.items() if isinstance(v, (list, dict)))
    if nested:
        out.append(f"fields {nested} hold lists or objects (records carry counts, never member lists)")
    t = r["time"]
    if type(t) not in _NUMBER or not math.isfinite(t) or t < 0:
        out.append(f"time {t!r} is not a finite number of seconds >= 0")
    for name in ("channel", "message_type", "flow_class"):
        if not _is_text(r[name]):
            out.append(f"{name} {r[name]!r} is not a non-empty string of at most {MAX_NAME} characters")
    peer = r["peer"]
    if type(peer) is not str or not PARTY.fullmatch(peer):
        out.append(f"peer {peer!r} is not a party name (global or boundary.<id>)")
    for name in ("wire_bytes", "round_id", "quorum"):
        if not _is_int(r[name]):
            out.append(f"{name} {r[name]!r} is not an integer >= 0")
    sha = r["payload_sha256"]
    if type(sha) is not str or not HEX64.fullmatch(sha):
        out.append("payload_sha256 is not 64 lowercase hex digits")
    prov = r["provenance"]
    if prov is not None and not _is_text(prov):
        out.append(f"provenance {prov!r} is neither null nor a name")
    direction, outcome = r["direction"], r["outcome"]
    if type(direction) is not str or type(outcome) is not str or (direction, outcome) not in OUTCOMES:
        out.append(f"direction {direction!r} with outcome {outcome!r} is not one of {sorted(OUTCOMES)}")
    reason = r["reason"]
    if outcome == "refused" and not _is_text(reason, MAX_REASON):
        out.append(f"a refused attempt must state its reason (at most {MAX_REASON} characters)")
    if outcome != "refused" and reason is not None:
        out.append("only a refused attempt carries a reason")
    peer_seq, peer_head = r["peer_seq"], r["peer_head"]
    if outcome == "received":
        if not _is_int(peer_seq) or type(peer_head) is not str or not HEX64.fullmatch(peer_head):
            out.append("a received message keeps the sender's chain head (peer_seq, peer_head)")
    elif peer_seq is not None or peer_head is not None:
        out.append("only a received message keeps the sender's chain head")
    return out
