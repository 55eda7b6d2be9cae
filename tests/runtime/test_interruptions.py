"""`echelon audit` on a deployment's interruptions: a message lost where a party was stopped
(Ctrl-C) or where a stream ended is in flight, not a violation; the same loss with no
interruption on record stays a violation."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.report import IN_FLIGHT, UNANCHORED
from echelon.audit.verify import verify_run
from echelon.v1 import boundary_pb2
from tests.audit.runs import GLOBAL, cross, fields, open_logs, training_messages

B = "boundary.b0"
# The run's configuration names b0 and b1; b1 only opens and closes its log. The keys come from
# the run directory (UNANCHORED accepted): these tests are about the cross-check.
PARTIES = (GLOBAL, B, "boundary.b1")
ACCEPT = frozenset({UNANCHORED, IN_FLIGHT})


def _keys() -> dict[str, Ed25519PrivateKey]:
    return {p: Ed25519PrivateKey.generate() for p in PARTIES}


def _run(tmp_path, interruption: str | None):
    """One outer step crossed, then the global plane's next reference lost on the way."""
    logs = open_logs(tmp_path, _keys())
    messages = training_messages(B, 1, np.random.default_rng(0))
    for sender, receiver, body in messages:
        cross(logs, 1.0, sender, receiver, body)
    _, _, reference = messages[-1]
    logs[GLOBAL].append(**fields(2.0, GLOBAL, B, "out", reference, "b0"))  # sent, never received
    if interruption == "disconnect":
        logs[GLOBAL].checkpoint("disconnect")  # the global plane's stream to b0 ended
    ending = "interrupted" if interruption == "interrupted" else "close"
    for log in logs.values():
        log.close(ending)
    return tmp_path


@pytest.mark.parametrize("interruption", ["interrupted", "disconnect"])
def test_a_message_lost_at_an_interruption_is_in_flight(tmp_path, interruption):
    run = _run(tmp_path, interruption)
    # In flight is no violation, and still fails the audit until the user accepts it.
    strict = verify_run(run, accept=frozenset({UNANCHORED}))
    assert not strict.violations and not strict.ok
    report = verify_run(run, accept=ACCEPT)
    assert report.ok, [v.reason for v in report.violations]
    assert len(report.in_flight) == 1 and "in flight" in report.in_flight[0].reason
    assert all(log.closed and log.crashes == 0 for log in report.logs.values())


def test_the_same_loss_without_an_interruption_on_record_is_a_violation(tmp_path):
    report = verify_run(_run(tmp_path, None), accept=ACCEPT)
    assert not report.ok
    assert any("no matching receipt" in v.reason for v in report.violations)


def test_only_known_triggers_are_written(tmp_path):
    logs = open_logs(tmp_path, {GLOBAL: Ed25519PrivateKey.generate()})
    with pytest.raises(ValueError, match="explicit or disconnect"):
        logs[GLOBAL].checkpoint("close")
    with pytest.raises(ValueError, match="close or interrupted"):
        logs[GLOBAL].close("reopen")


def test_a_reference_lost_with_a_stream_and_sent_again_on_rejoin_is_one_crossing_and_one_in_flight(tmp_path):
    """The issue's "unreceived references" after a restart: the copy sent before the break was
    lost, the identical copy sent when the boundary came back arrived."""
    logs = open_logs(tmp_path, _keys())
    messages = training_messages(B, 1, np.random.default_rng(0))
    for sender, receiver, body in messages[:-1]:
        cross(logs, 1.0, sender, receiver, body)
    _, _, reference = messages[-1]
    logs[GLOBAL].append(**fields(2.0, GLOBAL, B, "out", reference, "b0"))  # lost with the stream
    logs[GLOBAL].checkpoint("disconnect")
    cross(logs, 3.0, GLOBAL, B, reference)  # the boundary is back: the same reference again
    cross(logs, 4.0, GLOBAL, B, boundary_pb2.CadenceUpdate(interval=2))
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path, accept=ACCEPT)
    assert report.ok, [v.reason for v in report.violations]
    assert [f.seq for f in report.in_flight] == [report.logs[GLOBAL].interruptions[0] - 1]
