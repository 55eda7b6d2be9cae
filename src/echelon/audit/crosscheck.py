"""The cross-check: what each party says it sent equals what its peer says it received.

For every directed link (sender, receiver, channel) the sender's "sent" records and the receiver's
"received" records are aligned in order by their content (type, flow class, wire bytes, payload
SHA-256, round, quorum, provenance). A record left without a partner is a violation, with one
exception: a message sent but never recorded received where one of the two parties crashed (lost
with a connection, or a receipt lost with unsynced data) or recorded an interruption (a stream
ended, or the party was stopped before the run ended) is reported as in flight, which fails the
audit unless the user accepts it. A receipt without its send is always a
violation: a send is on disk before the message leaves.

Countersigned heads: every received record keeps the sender's chain head (seq, hash) the message
carried. The sender's log must still hold that record with that hash (its hash commits to the
whole log before it), the heads of one link must increase, and the sender's record of the send
must be the very next one. A party that truncates, rewrites or re-creates its own log, even
under its own key and with a reopen, contradicts the heads its peers countersigned.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from echelon.audit.report import (
    CONTENT_FIELDS,
    COUNTERSIGN,
    CROSSCHECK,
    EVIDENCE,
    IN_FLIGHT,
    Content,
    Crossing,
    Finding,
    Link,
    LogReport,
    Tally,
)


@dataclass
class CrossCheck:
    """Link mismatches, crash losses, and the run's traffic with each crossing counted once."""

    violations: list[Finding] = field(default_factory=list)
    in_flight: list[Finding] = field(default_factory=list)
    traffic: Tally = field(default_factory=Tally)
    per_device_bytes: int = 0


def align(sent: list[Content], received: list[Content]) -> list[tuple[int, int]]:
    """Index pairs (i into `sent`, j into `received`), increasing in both, of equal content.

    Each received message is paired with the earliest unpaired sent one after the previous pair;
    in the usual case (both lists equal) this is a single linear pass.
    """
    pairs: list[tuple[int, int]] = []
    positions: dict[Content, list[int]] | None = None
    i = 0
    for j, content in enumerate(received):
        if i < len(sent) and sent[i] == content:
            pairs.append((i, j))
            i += 1
            continue
        if positions is None:
            positions = defaultdict(list)
            for k, c in enumerate(sent):
                positions[c].append(k)
        candidates = positions.get(content, [])
        k = bisect_left(candidates, i)
        if k < len(candidates):
            pairs.append((candidates[k], j))
            i = candidates[k] + 1
    return pairs


def _crashed(points: list[float], low: float, high: float) -> bool:
    return any(low < p <= high for p in points)


def _record(link: Link, crossing: Crossing) -> dict:
    return {"channel": link[2], "seq": crossing[0], **dict(zip(CONTENT_FIELDS, crossing[1], strict=True))}


def _check_heads(
    link: Link, sender: LogReport, receiver: LogReport, pairs: list[tuple[int, int]], out: CrossCheck
) -> None:
    """Every head `receiver` countersigned on `link` is in `sender`'s log, in order."""
    sent, received = sender.outgoing.get(link, []), receiver.incoming.get(link, [])
    paired = {j: i for i, j in pairs}
    last = -1
    for j, (seq, _, _, head) in enumerate(received):
        assert head is not None  # the record format requires one on every received record
        peer_seq, peer_head = head
        held = sender.hash_at(peer_seq)
        record = _record(link, received[j])
        if held != peer_head:
            what = "holds no such record" if held is None else "holds another record there"
            reason = (
                f"{receiver.party} countersigned {sender.party}'s chain head at seq {peer_seq}, and "
                f"{sender.party}'s log {what}: it was truncated, rewritten or re-created after the fact"
            )
            out.violations.append(Finding(receiver.party, seq, COUNTERSIGN, reason, record))
        elif peer_seq <= last:
            reason = (
                f"{sender.party}'s chain head went back from seq {last} to {peer_seq}: a replayed message"
            )
            out.violations.append(Finding(receiver.party, seq, COUNTERSIGN, reason, record))
        elif j in paired and sent[paired[j]][0] != peer_seq + 1:
            reason = (
                f"the message carried {sender.party}'s head at seq {peer_seq}, but {sender.party} recorded "
                f"sending it at seq {sent[paired[j]][0]}"
            )
            out.violations.append(Finding(receiver.party, seq, COUNTERSIGN, reason, record))
        last = max(last, peer_seq)


def _lost_at(
    i: int, pairs: list[tuple[int, int]], sent: list[Crossing], received: list[Crossing], points: tuple
) -> bool:
    """Whether unmatched send `i` lies where the receiver or the sender has one of `points`
    (receiver's, sender's): between the receipts of its neighbouring pairs, or between it and the
    next paired send."""
    receiver_points, sender_points = points
    k = bisect_left([p[0] for p in pairs], i)  # pairs before this message
    low = received[pairs[k - 1][1]][0] if k else -1
    high = received[pairs[k][1]][0] if k < len(pairs) else math.inf
    sent_next = sent[pairs[k][0]][0] if k < len(pairs) else math.inf
    return _crashed(receiver_points, low, high) or _crashed(sender_points, sent[i][0], sent_next)


def _prefer_resends(
    pairs: list[tuple[int, int]], sent: list[Crossing], received: list[Crossing], breaks: tuple
) -> list[tuple[int, int]]:
    """`pairs` with a receipt moved to a later identical send (before the next pair) when the
    earlier one it leaves unmatched lies at a break: a message lost with a stream and sent again
    when the peer came back (a whole reference on rejoin) arrived once, as the later copy."""
    pairs = list(pairs)
    for k, (a, r) in enumerate(pairs):
        end = pairs[k + 1][0] if k + 1 < len(pairs) else len(sent)
        later = [i for i in range(a + 1, end) if sent[i][1] == sent[a][1]]
        if later:
            moved = [*pairs[:k], (later[-1], r), *pairs[k + 1 :]]
            if _lost_at(a, moved, sent, received, breaks):
                pairs = moved
    return pairs


def _check_link(link: Link, sender: LogReport, receiver: LogReport, out: CrossCheck) -> None:
    sent, received = sender.outgoing.get(link, []), receiver.incoming.get(link, [])
    crashes = (receiver.crash_points, sender.crash_points)
    interruptions = (receiver.interruptions, sender.interruptions)
    breaks = (crashes[0] + interruptions[0], crashes[1] + interruptions[1])
    pairs = align([c[1] for c in sent], [c[1] for c in received])
    pairs = _prefer_resends(pairs, sent, received, breaks)
    sent_pos, received_pos = [p[0] for p in pairs], [p[1] for p in pairs]
    _, to, channel = link
    _check_heads(link, sender, receiver, pairs, out)

    paired = set(sent_pos)
    for i, crossing in enumerate(sent):
        if i in paired:
            continue
        k = bisect_left(sent_pos, i)  # pairs before this message
        low = received[pairs[k - 1][1]][0] if k else -1
        high = received[pairs[k][1]][0] if k < len(pairs) else math.inf
        record = _record(link, crossing)
        if _lost_at(i, pairs, sent, received, crashes):
            reason = f"sent on {channel}, not received: in flight when {sender.party} or {to} crashed"
            out.in_flight.append(Finding(sender.party, crossing[0], IN_FLIGHT, reason, record))
            continue
        if _lost_at(i, pairs, sent, received, interruptions):
            reason = (
                f"sent on {channel}, not received: in flight when a stream of {sender.party} or {to} "
                "ended or the party was interrupted"
            )
            out.in_flight.append(Finding(sender.party, crossing[0], IN_FLIGHT, reason, record))
            continue
        reason = f"recorded sent on {channel} but {to} recorded no matching receipt"
        refusals = [s for s in receiver.refused_incoming.get(link, []) if low < s <= high]
        if refusals:
            reason += f" (its ingress guard refused a message on this link at seq {refusals[0]})"
        out.violations.append(Finding(sender.party, crossing[0], CROSSCHECK, reason, record))

    paired = set(received_pos)
    for j, crossing in enumerate(received):
        if j in paired:
            continue
        out.traffic.add(crossing[1][1], crossing[1][0], crossing[1][2])  # its sender counted none
        out.per_device_bytes += crossing[2]
        # A send is on disk before it leaves (`AuditLog`): no crash of the sender loses its record.
        reason = f"recorded received on {channel} but {sender.party} recorded no matching send"
        out.violations.append(
            Finding(receiver.party, crossing[0], CROSSCHECK, reason, _record(link, crossing))
        )


def cross_check(logs: dict[str, LogReport]) -> CrossCheck:
    """Check every link the logs mention; totals count each crossing once (by its sender's record)."""
    out = CrossCheck()
    for log in logs.values():
        out.traffic.merge(log.sent)
        out.per_device_bytes += sum(c[2] for crossings in log.outgoing.values() for c in crossings)
    links = sorted({link for log in logs.values() for link in (*log.outgoing, *log.incoming)})
    for link in links:
        frm, to, channel = link
        if frm in logs and to in logs:
            _check_link(link, logs[frm], logs[to], out)
            continue
        missing, present = (frm, logs[to]) if frm not in logs else (to, logs[frm])
        crossings = present.incoming.get(link, []) if frm not in logs else present.outgoing.get(link, [])
        if frm not in logs:
            for c in crossings:
                out.traffic.add(c[1][1], c[1][0], c[1][2])
                out.per_device_bytes += c[2]
        reason = (
            f"{len(crossings)} messages on {channel} involve {missing}, which has no audit log in this run"
        )
        out.violations.append(Finding(present.party, None, EVIDENCE, reason))
    return out
