"""A deployed boundary's admission of devices: who its certificate and the run file make a
member, who is refused, and that every decision is in the boundary's audit log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest

from echelon.audit.layout import log_path
from echelon.audit.verify import verify_log
from echelon.config import RunConfig
from echelon.parties import device_address
from echelon.runtime.grpc.boundary_role import BoundaryRole
from echelon.runtime.grpc.tls import init_certs, load_credentials
from echelon.runtime.grpc.transport import LOCAL_METHOD
from echelon.v1 import device_pb2
from tests.helpers import small_run
from tests.runtime.test_grpc import _call, _port, _tls, _with_boundary

JOINER = {"id": "d9", "tokens_per_s": 1000.0}


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """A run whose device d9 joins boundary b0, certified by the run's CA (as `echelon launch`
    and `echelon certs init` do), and a certificate of the same CA for a device `dx` of b0 that
    the run file does not name (issued out of band)."""
    cfg = RunConfig.model_validate(
        small_run(churn={"joins": [{"at_s": 5, "boundary": "b0", "device": JOINER}]})
    )
    certs = tmp_path_factory.mktemp("certs") / "certs"
    devices = cfg.certified_devices()
    assert devices["b0"][-1] == "d9"
    init_certs(certs, devices | {"b0": [*devices["b0"], "dx"]})
    return cfg, certs


def _role(cfg: RunConfig, certs: Path, run_dir: Path, resume: bool = False) -> BoundaryRole:
    return BoundaryRole(cfg, load_credentials(certs, "boundary.b0"), "b0", _port(), _port(), run_dir, resume)


async def _close(role: BoundaryRole) -> None:
    role.audit.close()
    await role.server.stop(None)  # never started: nothing of it is left to a later event loop


def _decisions(run_dir: Path, certs: Path) -> list[tuple[str, str]]:
    """(event, reason) of every membership decision in b0's audit log, which must verify."""
    key = load_credentials(certs, "boundary.b0").audit_key().public_key()
    report = verify_log(log_path(run_dir, "boundary.b0"), key)
    assert report.chain_ok and report.signatures_ok, [v.reason for v in report.violations]
    refused = [("refused", f.reason) for f in report.refused if f.record["kind"] == "membership"]
    return [(f.category, f.reason) for f in report.membership] + refused


def test_a_joiner_is_admitted_once_and_the_rest_are_refused_on_record(joined, tmp_path):
    cfg, certs = joined

    async def scenario():
        role = _role(cfg, certs, tmp_path)
        try:
            d9 = device_address("d9")
            assert not role.plane.member(d9)
            assert role.admission("device.d9", "boundary.b0") is None
            assert role.plane.member(d9)
            assert role.admission("device.d9", "boundary.b0") is None  # a reconnection: no new admission
            assert role.admission("device.d0", "boundary.b0") is None  # the initial membership
            return [
                role.admission("device.d2", "boundary.b1"),  # a valid certificate of another boundary
                role.admission("device.dx", "boundary.b0"),  # this boundary's CA, unknown to the run
                role.admission("boundary.b1", None),  # no device at all
            ]
        finally:
            await _close(role)

    other, unknown, nobody = asyncio.run(scenario())
    assert other == "its certificate names boundary.b1, not boundary.b0"
    assert unknown.startswith("it is not a device of this boundary")
    assert nobody == "its certificate names no device"
    decisions = _decisions(tmp_path, certs)
    assert [e for e, _ in decisions] == ["admitted", "refused", "refused"]
    assert "device.d9 admitted" in decisions[0][1] and "churn.joins[0]" in decisions[0][1]
    assert decisions[1][1].startswith("device.d2 refused") and decisions[2][1].startswith("device.dx refused")


def test_a_device_that_said_goodbye_is_refused_even_after_the_boundary_restarts(joined, tmp_path):
    cfg, certs = joined

    async def depart():
        role = _role(cfg, certs, tmp_path)
        try:
            assert role.admission("device.d9", "boundary.b0") is None
            role.node.deliver(device_address("d9"), device_pb2.Hello(device_id="d9"))
            role.node.deliver(device_address("d9"), device_pb2.Goodbye(device_id="d9"))
            role.after_event()
            return role.admission("device.d9", "boundary.b0")
        finally:
            await _close(role)

    async def restarted():
        role = _role(cfg, certs, tmp_path, resume=True)
        try:
            assert role.plane.member(device_address("d9"))  # the admission survived the restart
            return role.admission("device.d9", "boundary.b0"), role.admission("device.d0", "boundary.b0")
        finally:
            await _close(role)

    assert asyncio.run(depart()) == "it left the run for good"
    assert asyncio.run(restarted()) == ("it left the run for good", None)
    decisions = _decisions(tmp_path, certs)
    assert [e for e, _ in decisions] == ["admitted", "departed", "refused", "refused"]


def test_refused_devices_get_permission_denied_over_grpc_and_a_log_line(joined, caplog, tmp_path):
    cfg, certs = joined
    caplog.set_level(logging.WARNING, logger="echelon.serve")

    async def probe(at):
        return [
            await _call(_tls(certs, p), at, "boundary.b0", LOCAL_METHOD) for p in ("device.dx", "device.d2")
        ]

    codes = asyncio.run(_with_boundary(cfg, certs, "b0", probe, tmp_path))
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert "refused a stream from device.dx: it is not a device of this boundary" in caplog.text
    assert [e for e, _ in _decisions(tmp_path, certs)] == ["refused", "refused"]


def test_a_joiner_certificate_from_another_ca_never_reaches_admission(joined, tmp_path):
    cfg, certs = joined
    forged = tmp_path / "forged"
    init_certs(forged, cfg.certified_devices())  # the same names, another CA

    async def probe(at):
        return await _call(_tls(forged, "device.d9"), at, "boundary.b0", LOCAL_METHOD)

    assert asyncio.run(_with_boundary(cfg, certs, "b0", probe, tmp_path)) == grpc.StatusCode.UNAVAILABLE
    assert _decisions(tmp_path, certs) == []  # the TLS handshake failed: no device was named, none admitted
