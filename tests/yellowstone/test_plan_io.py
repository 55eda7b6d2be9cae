"""plan.json round-trips, refuses other schema versions; the CLI writes plan files and profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from echelon.cli import main
from echelon.errors import UserError
from echelon.yellowstone.fleet import Fleet, load_fleet
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
