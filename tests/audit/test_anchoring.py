"""A party that rewrites its own history is caught: countersigned chain heads, pinned keys, the
run binding and the parties of config.yaml (issue 12, "The audit must catch a party that rewrites
its own history"). Before this change each of these passed `echelon audit` with exit 0."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.anchor import RunBinding, deployment_id, load_pins
from echelon.audit.keys import fingerprint, load_signing_key
from echelon.audit.layout import log_path, public_key_path
from echelon.audit.log import AuditLog
from echelon.audit.record import decode
from echelon.audit.report import COUNTERSIGN, CRASH, CROSSCHECK, EVIDENCE, IN_FLIGHT, SIGNATURE, UNANCHORED
from echelon.audit.verify import verify_run
from echelon.cli import main
from echelon.errors import UserError
from echelon.v1 import boundary_pb2
from tests.audit.runs import BINDING, CONFIG, fields, pin, write_run

PARTIES = ("global", "boundary.b0", "boundary.b1")
ALL = frozenset({CRASH, IN_FLIGHT})


@pytest.fixture
def keys() -> dict[str, Ed25519PrivateKey]:
    return {p: Ed25519PrivateKey.generate() for p in PARTIES}


@pytest.fixture
def run(tmp_path: Path, keys) -> Path:
    write_run(tmp_path / "run", keys, steps=3)
    pin(tmp_path / "audit-keys.json", keys)
    return tmp_path / "run"


def _verify(run: Path, accept: frozenset[str] = frozenset()):
    return verify_run(run, run.parent / "audit-keys.json", accept)


def _categories(report) -> set[str]:
    return {f.category for f in report.failures}


def _messages(path: Path) -> list[dict]:
    records = [decode(line) for line in path.read_bytes().splitlines(keepends=True)]
    return [
        {k: r[k] for k in r if k not in ("kind", "seq", "prev_hash", "hash")}
        for r in records
        if r["kind"] == "message"
    ]


def _rewrite(run: Path, party: str, key: Ed25519PrivateKey, keep) -> None:
    """`party` rewrites its log from scratch under `key`, keeping the messages `keep` accepts."""
    path = log_path(run, party)
    messages = [m for m in _messages(path) if keep(m)]
    path.unlink()
    with AuditLog.create(path, party, key, "virtual", BINDING, min_quorum=2) as log:
        for m in messages:
            log.append(**m)


def test_a_clean_run_passes_with_pinned_keys(run):
    assert _verify(run).ok


def test_a_party_that_truncates_its_own_log_and_reopens_it_is_caught(run, keys):
    # boundary.b0 cuts its last send and everything after it, then reopens the log under its own
    # key (what a crash would look like): the global plane holds the receipt, and its countersigned
    # head says b0's next record was that send.
    path = log_path(run, "boundary.b0")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-3]))  # the close checkpoint, a receipt, the last send
    AuditLog.open(path, keys["boundary.b0"]).close()
    report = _verify(run, accept=ALL)  # even accepting crashes and messages lost in flight
    assert not report.ok
    assert CROSSCHECK in _categories(report) or COUNTERSIGN in _categories(report)
    # Without the acceptances the crash itself fails the audit too.
    assert CRASH in _categories(_verify(run))


def test_a_log_recreated_under_its_own_key_contradicts_the_heads_its_peer_countersigned(run, keys):
    # The global plane drops one of its receipts from boundary.b1 and re-signs a fresh log with its
    # real key: b1's log still matches, but b1 countersigned global's heads, which moved.
    _rewrite(
        run,
        "global",
        keys["global"],
        lambda m: not (m["peer"] == "boundary.b1" and m["message_type"] == "echelon.v1.BoundaryStatus"),
    )
    categories = _categories(_verify(run, accept=ALL))
    assert COUNTERSIGN in categories and CROSSCHECK in categories


def test_a_boundary_dropped_and_scrubbed_from_the_global_log_is_caught(run, keys):
    _rewrite(run, "global", keys["global"], lambda m: m["peer"] != "boundary.b1")
    log_path(run, "boundary.b1").unlink()
    public_key_path(run / "audit", "boundary.b1").unlink()
    report = _verify(run, accept=ALL)
    assert any(f.category == EVIDENCE and "has no audit log" in f.reason for f in report.failures)
    assert COUNTERSIGN in _categories(report)  # b0 countersigned global heads that held b1's crossings
    # Dropping b1 from config.yaml as well: b0's log is bound to the configuration that named it.
    cfg = CONFIG.model_dump(mode="json")
    cfg["boundaries"] = cfg["boundaries"][:1]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    report = _verify(run, accept=ALL)
    assert any("another configuration" in f.reason for f in report.failures)


def test_logs_re_signed_under_fresh_keys_fail_against_pinned_keys(tmp_path, run):
    # Whoever can write the run directory regenerates it without one outer step, under fresh keys
    # whose public halves it places in the run directory.
    fresh = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    shutil.rmtree(run)
    write_run(run, fresh, steps=2)
    assert SIGNATURE in _categories(_verify(run, accept=ALL))
    # Without pins the audit refuses to vouch for the keys...
    report = verify_run(run)
    assert not report.ok and {f.category for f in report.failures} == {UNANCHORED}
    # ...and accepting the run directory's keys shows only that the logs agree with each other.
    assert verify_run(run, accept=frozenset({UNANCHORED})).ok


def test_a_log_from_another_run_does_not_fit(tmp_path, run, keys):
    other = tmp_path / "other"
    write_run(other, keys, steps=3, binding=RunBinding("f" * 32, BINDING.config_sha256))
    shutil.copy(log_path(other, "boundary.b0"), log_path(run, "boundary.b0"))
    report = _verify(run, accept=ALL)
    assert any("different runs" in f.reason for f in report.failures)


def test_messages_in_flight_at_a_crash_fail_unless_accepted(tmp_path, keys):
    run = tmp_path / "run"
    logs = write_run(run, keys, steps=1, close=False)
    pin(tmp_path / "audit-keys.json", keys)
    body = boundary_pb2.SyncRequest(outer_step=2)
    logs["global"].append(**fields(5.0, "global", "boundary.b0", "out", body, "b0"))
    b0 = logs["boundary.b0"]
    os.close(b0._fd)  # boundary.b0 crashes before it records the receipt
    b0._fd = -1
    AuditLog.open(log_path(run, "boundary.b0"), keys["boundary.b0"]).close()
    for party in ("global", "boundary.b1"):
        logs[party].close()
    report = _verify(run)
    assert _categories(report) == {IN_FLIGHT, CRASH} and not report.violations
    assert not _verify(run, accept=frozenset({CRASH})).ok
    assert _verify(run, accept=ALL).ok


def test_certs_init_pins_every_audit_key_and_the_deployment(tmp_path):
    from echelon.runtime.grpc.tls import init_certs

    init_certs(tmp_path / "certs", {"b0": ["d0"], "b1": ["d1"]})
    pins = load_pins(tmp_path / "certs")
    assert sorted(pins.keys) == ["boundary.b0", "boundary.b1", "global"]
    for party, key in pins.keys.items():
        signing = load_signing_key(tmp_path / "certs" / party / f"{party}.key.pem")
        assert fingerprint(key) == fingerprint(signing.public_key())
    assert pins.deployment == deployment_id((tmp_path / "certs" / "ca.pem").read_bytes())


def test_a_broken_pins_file_is_a_clear_user_error(run, capsys):
    bad = run.parent / "audit-keys.json"
    bad.write_text('{"format": "echelon-audit-keys/1", "parties": {"global": {"ed25519": "eA=="}}}')
    with pytest.raises(UserError, match=r"parties\.global\.ed25519"):
        load_pins(bad)
    assert main(["audit", str(run), "--keys", str(bad)]) == 2
    assert "parties.global.ed25519" in capsys.readouterr().err
