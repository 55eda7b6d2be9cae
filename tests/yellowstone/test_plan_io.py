"""plan.json round-trips, refuses other schema versions; the CLI writes plan files and profiles."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from echelon.cli import main
from echelon.errors import UserError
from echelon.yellowstone import probe
from echelon.yellowstone.fleet import Fleet, LinkEntry, load_fleet
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.plan import SCHEMA_VERSION, Plan, read_plan, write_plan
from echelon.yellowstone.planner import plan_fleet

EXAMPLES = Path(__file__).parents[2] / "examples" / "fleets"


@pytest.fixture(scope="module")
def hospital_plan() -> Plan:
    fleet = load_fleet(EXAMPLES / "hospital_pair.yaml")
    return plan_fleet(fleet, build_profile("llama-8b", PRESETS["llama-8b"], trainable="lora"))


def test_plan_json_round_trips(tmp_path, hospital_plan):
    path = tmp_path / "plan.json"
    write_plan(hospital_plan, path)
    back = read_plan(path)
    assert back == hospital_plan and back.schema_version == SCHEMA_VERSION
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="schema_version"):
        read_plan(path)


def test_cli_plan_writes_files_and_explains(tmp_path, capsys):
    out = tmp_path / "plan"
    code = main(
        [
            "plan",
            str(EXAMPLES / "hospital_pair.yaml"),
            "--model",
            "llama-8b",
            "--lora",
            "--out",
            str(out),
            "--explain",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"plan.json", "plan.schema.json", "plan.png"}
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert "hospital-a" in printed and "why" in printed and "check memory" in printed
    assert read_plan(out / "plan.json").boundaries[1].id == "hospital-b"


def test_cli_plan_bad_flag_values_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["plan", str(EXAMPLES / "seed.yaml"), "--model", "llama-1b", "--micro-batch", "0"])
    assert err.value.code == 2
    assert main(["plan", str(EXAMPLES / "seed.yaml"), "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_cli_profile_writes_fleet_entries(tmp_path):
    out = tmp_path / "devices.yaml"
    assert (
        main(["profile", "--out", str(out), "--seconds", "0.05", "--boundary", "lab", "--site", "desk"]) == 0
    )
    devices = yaml.safe_load(out.read_text())["devices"]
    assert devices[0]["tflops"] > 0 and devices[0]["memory_gib"] > 0
    fleet = Fleet.model_validate(
        {
            "name": "me",
            "access_tiers": ["internal"],
            "boundaries": [{"id": "lab", "data_tier": "internal"}],
            "sites": [{"id": "desk", "bandwidth_gbps": 10}],
            "devices": devices,
        }
    )
    assert fleet.devices[0].boundary == "lab"


def test_an_old_plan_is_refused_with_the_fix(tmp_path, hospital_plan):
    path = tmp_path / "plan.json"
    write_plan(hospital_plan, path)
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=r"schema_version 1, but .* reads schema_version 2 .* re-run `echelon plan`"
    ):
        read_plan(path)


def test_plans_never_hold_non_finite_numbers(hospital_plan):
    text = hospital_plan.model_dump_json()
    assert "null" not in text.replace('"standby":null', "").replace('"replacement":null', "").replace(
        '"fallback":null', ""
    )
    bad = hospital_plan.model_copy(deep=True)
    with pytest.raises(ValueError, match="finite"):
        Plan.model_validate({**bad.model_dump(), "tokens_per_s": float("inf")})


def _uncleared_hospital_b(tmp_path: Path) -> Path:
    data = yaml.safe_load((EXAMPLES / "hospital_pair.yaml").read_text())
    for d in data["devices"]:
        if d["boundary"] == "hospital-b":
            d["access_tier"] = "staff"
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_boundary_that_cannot_be_planned_refuses_only_itself(tmp_path, capsys):
    fleet = load_fleet(_uncleared_hospital_b(tmp_path))
    plan = plan_fleet(fleet, build_profile("llama-8b", PRESETS["llama-8b"], trainable="lora"))
    assert [b.id for b in plan.boundaries] == ["hospital-a"] and plan.tokens_per_s > 0
    assert [(r.boundary, r.reason) for r in plan.refused] == [("hospital-b", "no_cleared_device")]
    assert "hospital-b" in plan.refused[0].message and all(c.ok for c in plan.checks)
    out = tmp_path / "out"
    code = main(["plan", str(tmp_path / "fleet.yaml"), "--model", "llama-8b", "--lora", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 3 and "refused" in printed and "hospital-b" in printed
    assert read_plan(out / "plan.json").refused[0].boundary == "hospital-b"


def test_profile_peer_measures_a_link_from_both_ends(tmp_path):
    port: list[int] = []
    ready = threading.Event()
    result: dict = {}

    def waiting() -> None:
        result["wait"] = probe.wait(
            0, "a", 0.05, host="127.0.0.1", ready=lambda p: (port.append(p), ready.set())
        )

    thread = threading.Thread(target=waiting)
    thread.start()
    assert ready.wait(10)
    dialled = probe.dial("127.0.0.1", port[0], "b", 0.05)
    thread.join(10)
    waited = result["wait"]
    assert dialled.entry()["bandwidth_gbps"] == waited.entry()["bandwidth_gbps"] > 0
    assert dialled.sites == ("b", "a") and waited.sites == ("a", "b")
    assert dialled.latency_ms == pytest.approx(waited.latency_ms) and 0 <= dialled.latency_ms < 100
    assert LinkEntry.model_validate(dialled.entry()).bandwidth_gbps > 0


def test_profile_peer_refuses_what_is_not_a_probe(capsys):
    server = socket.create_server(("127.0.0.1", 0))

    def talk_http() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
            conn.recv(1024)

    thread = threading.Thread(target=talk_http)
    thread.start()
    port = server.getsockname()[1]
    assert main(["profile", "--peer", f"127.0.0.1:{port}", "--seconds", "0.05"]) == 2
    thread.join(10)
    server.close()
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "not an echelon probe" in err
    assert main(["profile", "--peer", "no-port-here"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_profile_times_collectives_and_the_pipeline_and_the_fleet_takes_them():
    """On three ranks a measured step carries what FSDP2 adds to a micro-batch of one decoder layer
    and what DDP adds to the backward that reduces its gradients, over two ranks (timed on the
    first two, and given to the third as their mean: the processes are alike) and over all three,
    and what the pipelining runtime adds per stage (ranks 0 and 1, the third their mean); a fleet
    file takes them all and prices with them. One rank has nothing to shard, reduce or pipeline:
    none of them."""
    from echelon.yellowstone.cli_profile import measured_fields
    from echelon.yellowstone.cost import ddp_rates, fsdp_rates, stage_rates
    from echelon.yellowstone.fleet import Fleet
    from echelon.yellowstone.measure import StepProbe, measure_model_steps
    from echelon.yellowstone.model_profile import PRESETS, build_profile

    probe = StepProbe("tiny", "full", 4, seq_len=16, micro_batch=2, micro_batches=1, steps=2)
    three = measure_model_steps(probe, 3)
    assert [sorted(t.fsdp_s) for t in three] == [[2, 3], [2, 3], [2, 3]]
    assert three[2].fsdp_s[2] == pytest.approx((three[0].fsdp_s[2] + three[1].fsdp_s[2]) / 2)
    assert all(v >= 0 for t in three for v in t.fsdp_s.values())
    # DDP's reduction alike
    assert [sorted(t.ddp_s) for t in three] == [[2, 3], [2, 3], [2, 3]]
    assert three[2].ddp_s[2] == pytest.approx((three[0].ddp_s[2] + three[1].ddp_s[2]) / 2)
    assert all(v >= 0 for t in three for v in t.ddp_s.values())
    # the pipelining runtime, timed on ranks 0 and 1 and given to the third as their mean
    assert all(t.stage_s is not None and 0 <= t.stage_s < 0.1 for t in three)
    assert three[2].stage_s == pytest.approx((three[0].stage_s + three[1].stage_s) / 2)
    one = measure_model_steps(probe, 1)[0]
    assert one.fsdp_s is None and one.ddp_s is None and one.stage_s is None
    step = {"model": "tiny", "trainable": "full", "seq_len": 16, "micro_batch": 2, "micro_batches": 1}
    devices = [
        {"id": f"cpu{i}", "boundary": "lab", "site": "desk", "memory_gib": 4, "tflops": 0.05,
         "access_tier": "lab", "measured_steps": [{**step, **measured_fields(t)}]}
        for i, t in enumerate(three)
    ]  # fmt: skip
    fleet = Fleet.model_validate(
        {
            "name": "desk",
            "access_tiers": ["public", "lab"],
            "boundaries": [{"id": "lab", "data_tier": "lab"}],
            "sites": [{"id": "desk", "bandwidth_gbps": 10}],
            "devices": json.loads(json.dumps(devices)),  # as a JSON or YAML file gives them
        }
    )
    profile = build_profile("tiny", PRESETS["tiny"], trainable="full", seq_len=16, micro_batch=2)
    layer = next(u.weight_bytes for u in profile.units if u.kind == "layer")
    written = {d["id"]: d["measured_steps"][0]["fsdp_s"] for d in devices}
    assert fsdp_rates(fleet, profile) == {
        k: tuple((n, pytest.approx(v[n] / layer)) for n in sorted(v)) for k, v in written.items()
    }
    grad = next(u.grad_bytes for u in profile.units if u.kind == "layer")
    assert ddp_rates(fleet, profile) == {
        d["id"]: tuple(
            (n, pytest.approx(v / grad)) for n, v in sorted(d["measured_steps"][0]["ddp_s"].items())
        )
        for d in devices
    }
    assert stage_rates(fleet) == {d["id"]: pytest.approx(d["measured_steps"][0]["stage_s"]) for d in devices}
