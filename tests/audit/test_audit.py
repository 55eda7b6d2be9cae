"""The audit log and its offline verifier: tampering of any kind is detected; real runs verify."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from echelon.audit.keys import write_public_key
from echelon.audit.layout import log_path
from echelon.audit.log import AuditLog
from echelon.audit.record import decode, encode
from echelon.audit.report import (
    CONTRACT,
    CROSSCHECK,
    EVIDENCE,
    INCOMPLETE,
    INTEGRITY,
    SIGNATURE,
    UNANCHORED,
)
from echelon.audit.verify import verify_run
from echelon.cli import main
from echelon.contract.guard import ContractViolation, EgressGuard
from echelon.contract.policy import Terms
from echelon.errors import UserError
from echelon.tensors import encode as encode_tensor
from echelon.v1 import boundary_pb2, tensor_pb2
from tests.audit.runs import BINDING, cross, fields, pin, tensor, write_run
from tests.helpers import small_run

PARTIES = ("global", "boundary.b0", "boundary.b1")


@pytest.fixture
def clean_run(tmp_path: Path) -> Path:
    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    run = tmp_path / "run"
    write_run(run, keys, steps=3)
    pin(tmp_path / "audit-keys.json", keys)
    return run


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _categories(run: Path) -> set[str]:
    return {v.category for v in verify_run(run).violations}


def test_a_clean_run_verifies_with_zero_per_device_bytes(clean_run):
    report = verify_run(clean_run, clean_run.parent / "audit-keys.json")
    assert report.ok, [v.reason for v in report.failures]
    assert report.anchor.startswith("pinned by")
    assert report.per_device_bytes == 0
    # 3 steps x 2 boundaries x 4 message types, each counted once.
    assert report.traffic.total_messages == 24


def test_editing_one_byte_breaks_the_chain(clean_run):
    path = log_path(clean_run, "boundary.b0")
    lines = _lines(path)
    lines[4] = lines[4].replace(b'"wire_bytes":', b'"wire_bytes":1', 1)  # 123 -> 1123
    path.write_bytes(b"".join(lines))
    assert INTEGRITY in _categories(clean_run)


def test_editing_a_byte_and_fixing_its_hash_still_breaks_the_next_link(clean_run):
    path = log_path(clean_run, "global")
    lines = _lines(path)
    record = decode(lines[3])
    record.pop("hash")
    record["wire_bytes"] += 1
    lines[3], _ = encode(record)
    path.write_bytes(b"".join(lines))
    assert INTEGRITY in _categories(clean_run)


@pytest.mark.parametrize("edit", ["delete", "reorder", "truncate", "torn"])
def test_deleting_reordering_or_truncating_records_is_detected(clean_run, edit):
    path = log_path(clean_run, "boundary.b1")
    lines = _lines(path)
    if edit == "delete":
        del lines[5]
    elif edit == "reorder":
        lines[4], lines[5] = lines[5], lines[4]
    elif edit == "truncate":
        lines = lines[:-3]
    else:
        lines[-1] = lines[-1][:40]
    path.write_bytes(b"".join(lines))
    found = _categories(clean_run)
    expected = {"delete": INTEGRITY, "reorder": INTEGRITY, "truncate": INCOMPLETE, "torn": INCOMPLETE}[edit]
    assert expected in found
    assert not verify_run(clean_run).ok


def test_a_log_re_signed_with_another_key_fails_the_signature_check(clean_run):
    other = Ed25519PrivateKey.generate()
    (clean_run / "audit" / "global.pub.pem").unlink()
    write_public_key(clean_run / "audit" / "global.pub.pem", other.public_key())
    assert SIGNATURE in _categories(clean_run)


def test_a_public_key_of_an_unknown_type_is_a_bad_key_not_a_crash(clean_run, capsys):
    pem = clean_run / "audit" / "global.pub.pem"
    lines = pem.read_bytes().split(b"\n")
    assert lines[1][10:11] == b"V"
    lines[1] = lines[1][:10] + b"A" + lines[1][11:]  # the algorithm's OID: Ed25519 becomes unknown
    pem.write_bytes(b"\n".join(lines))
    report = verify_run(clean_run)
    assert any(
        v.category == EVIDENCE and v.party == "global" and "not a PEM public key" in v.reason
        for v in report.violations
    )
    assert main(["audit", str(clean_run), "--trust-run-keys", "--json"]) == 1
    failures = json.loads(capsys.readouterr().out)["failures"]
    assert any("global.pub.pem is not a PEM public key" in f["reason"] for f in failures)


def test_the_two_ends_of_a_crossing_must_agree(tmp_path):
    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    # boundary.b0 claims a send the global plane never received.
    body = boundary_pb2.BoundaryStatus(middle_step=9, tokens=1, contributors=2)
    logs["boundary.b0"].append(**fields(5.0, "boundary.b0", "global", "out", body, "b0"))
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path)
    assert [v.category for v in report.violations] == [CROSSCHECK]


def test_a_torn_log_reopens_only_with_repair_and_keeps_what_it_removed(tmp_path):
    key = Ed25519PrivateKey.generate()
    keys = {"global": key, "boundary.b0": Ed25519PrivateKey.generate()}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    path = log_path(tmp_path, "global")
    logs["global"]._fd, fd = -1, logs["global"]._fd  # simulate a crash: no close checkpoint
    os.write(fd, b'{"kind":"message","seq"')  # a write cut short
    os.close(fd)
    with pytest.raises(UserError, match="torn"):
        AuditLog.open(path, key)
    AuditLog.open(path, key, repair=True).close()
    logs["boundary.b0"].close()
    report = verify_run(tmp_path)
    assert report.logs["global"].repairs and report.logs["global"].repairs[0]["removed_bytes"] == 23
    assert report.logs["global"].closed


def test_refused_attempts_are_recorded_and_the_log_still_verifies(tmp_path):
    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    guard = EgressGuard("boundary.b0", Terms(2, 8), logs["boundary.b0"])
    delta = boundary_pb2.BoundaryDelta(
        outer_step=2, tokens=1, delta=encode_tensor(torch.ones(8), tensor_pb2.DEVICE)
    )
    with pytest.raises(ContractViolation):
        guard.send(9.0, delta, "global")
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path, accept=frozenset({UNANCHORED}))
    assert report.ok and report.per_device_bytes == 0
    assert len(report.refused) == 1 and "DEVICE" in report.refused[0].reason


def test_a_refused_tls_handshake_is_a_chained_refusal_and_tampering_with_it_is_detected(tmp_path):
    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    logs["boundary.b1"].handshake_refused(4.0, "not TLS (a plaintext client?) (WRONG_VERSION_NUMBER)")
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path, accept=frozenset({UNANCHORED}))
    assert report.ok
    (refusal,) = report.refused
    assert refusal.party == "boundary.b1" and "TLS handshake refused: not TLS" in refusal.reason
    path = log_path(tmp_path, "boundary.b1")
    path.write_bytes(path.read_bytes().replace(b"WRONG_VERSION_NUMBER", b"WRONG_VERSION_NUMBEX"))
    assert INTEGRITY in _categories(tmp_path)


def test_a_refusal_the_deployment_records_beside_its_guards_verifies(tmp_path):
    """What a role refuses after its ingress guard passed a message (a plane's refusal, a
    refused stream) is a well-formed record: an ill-formed one would kill the stream's task."""
    from echelon.runtime.grpc.evidence import record_refusal

    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    body = boundary_pb2.BoundaryDelta(outer_step=2, tokens=1)
    record_refusal(logs["global"], 5.0, "global", "boundary.b0", body.SerializeToString(), body, "too long")
    record_refusal(logs["global"], 6.0, "global", "boundary.b1", b"", None, "stream refused: a second one")
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path, accept=frozenset({UNANCHORED}))
    assert report.ok, [v.reason for v in report.violations]
    assert [r.reason for r in report.refused] == ["too long", "stream refused: a second one"]


def test_a_recorded_per_device_crossing_fails_the_audit(tmp_path):
    """Evidence that a DEVICE tensor crossed (say, a guard bypassed) is a contract violation."""
    keys = {p: Ed25519PrivateKey.generate() for p in PARTIES}
    logs = write_run(tmp_path, keys, steps=1, close=False)
    body = boundary_pb2.BoundaryDelta(outer_step=2, tokens=1, delta=tensor(np.ones(4), tensor_pb2.DEVICE, 0))
    cross(logs, 9.0, "boundary.b0", "global", body)
    for log in logs.values():
        log.close()
    report = verify_run(tmp_path)
    assert not report.ok and report.per_device_bytes > 0
    assert CONTRACT in {v.category for v in report.violations}


def test_audit_refuses_extra_fields_such_as_member_lists(tmp_path):
    log = AuditLog.create(
        tmp_path / "global.jsonl", "global", Ed25519PrivateKey.generate(), "virtual", BINDING
    )
    record = fields(1.0, "global", "boundary.b0", "out", boundary_pb2.SyncRequest(outer_step=1), "b0")
    with pytest.raises(TypeError):
        log.append(**record, members=["d0", "d1"])
    with pytest.raises(ValueError, match="lists"):
        log.append(**{**record, "quorum": ["d0", "d1"]})
    log.close()


def _train(tmp_path: Path, **overrides) -> Path:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(small_run(**overrides)))
    out = tmp_path / "out"
    assert main(["train", str(run_file), "--out", str(out), "--no-progress"]) == 0
    return out


def test_a_simulated_run_passes_echelon_audit_with_zero_per_device_bytes(tmp_path, capsys):
    out = _train(tmp_path)
    capsys.readouterr()
    assert main(["audit", str(out), "--json"]) == 1  # the keys in the run directory are not pinned
    assert json.loads(capsys.readouterr().out)["unanchored"]
    assert main(["audit", str(out), "--json", "--trust-run-keys"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["per_device_payload_bytes"] == 0 and report["violations"] == []
    summary = json.loads((out / "summary.json").read_text())
    # The audit saw exactly the cross-boundary bytes the simulation counted.
    assert report["traffic"]["bytes"] == sum(summary["cross_boundary_bytes"].values())


def test_a_non_admissible_strategy_fails_the_audit(tmp_path, capsys):
    out = _train(tmp_path, strategy="fedavg")
    capsys.readouterr()
    assert main(["audit", str(out), "--trust-run-keys"]) == 1
    assert "below the quorum" in capsys.readouterr().out


def test_audit_of_a_directory_without_logs_is_a_clear_user_error(tmp_path, capsys):
    assert main(["audit", str(tmp_path)]) == 2
    assert "holds no audit logs" in capsys.readouterr().err
