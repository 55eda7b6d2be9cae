"""Fleet files: cross-references and units are checked, errors name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from echelon.cli import main
from echelon.errors import ConfigError
from echelon.yellowstone.fleet import GIB, load_fleet

EXAMPLES = Path(__file__).parents[2] / "examples" / "fleets"


def _fleet() -> dict:
    return yaml.safe_load((EXAMPLES / "consumer_lab.yaml").read_text())


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda f: f["devices"][1].update(boundary="nope"), "devices[1].boundary", "unknown boundary 'nope'"),
        (lambda f: f["devices"][2].update(site="attic"), "devices[2].site", "unknown site 'attic'"),
        (
            lambda f: f["devices"][0].update(access_tier="secret"),
            "devices[0].access_tier",
            "unknown access tier",
        ),
        (
            lambda f: f["boundaries"][0].update(data_tier="x"),
            "boundaries[0].data_tier",
            "unknown access tier",
        ),
        (lambda f: f["links"][0].update(sites=["room-101", "moon"]), "links[0].sites", "unknown site 'moon'"),
        (lambda f: f["devices"][3].update(id="r101-4090-0"), "devices[3].id", "used twice"),
        (lambda f: f["devices"][0].update(memory_bytes=2**33), "devices[0]", "exactly one of memory_gib"),
        (lambda f: f["devices"][0].update(tflops=0), "devices[0].tflops", "greater than 0"),
        (lambda f: f["devices"][0].update(speed=3), "devices[0].speed", "unknown field"),
    ],
)
def test_bad_fleet_names_file_and_field(tmp_path, capsys, mutate, field, words):
    data = _fleet()
    mutate(data)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_fleet(path)
    assert field in str(err.value) and words in str(err.value) and str(path) in str(err.value)
    code = main(["plan", str(path), "--model", "llama-1b", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr().err
    assert code == 2 and field in captured and "Traceback" not in captured


def test_missing_fleet_file_exits_2(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "none.yaml"), "--model", "llama-1b"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_units_and_clearance():
    fleet = load_fleet(EXAMPLES / "seed.yaml")
    a100 = next(d for d in fleet.devices if d.id == "dc-a100-0")
    assert a100.memory == 80 * GIB and a100.flops == 180e12
    cleared = [d.id for d in fleet.devices if fleet.cleared(d)]
    assert cleared == ["sec-a5000-0", "sec-a5000-1"]
    assert fleet.link("office", "edge") is None and fleet.link("edge", "datacenter").bandwidth_gbps == 1


def test_seed_fleet_matches_the_seed_story():
    fleet = load_fleet(EXAMPLES / "seed.yaml")
    mem = sorted(d.memory_gib for d in fleet.devices)
    assert len(fleet.devices) == 18 and len(fleet.access_tiers) == 3
    assert (
        sum(m >= 80 for m in mem) == 4 and sum(m == 24 for m in mem) == 8 and sum(m <= 16 for m in mem) == 6
    )
    assert sum(link.bandwidth_gbps <= 1 for link in fleet.links) == 2


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda f: f["devices"][0].update(memory_gib=float("inf")), "devices[0].memory_gib", "finite"),
        (lambda f: f["devices"][0].update(tflops=float("inf")), "devices[0].tflops", "finite"),
        (lambda f: f["devices"][0].update(tflops=float("nan")), "devices[0].tflops", "finite"),
        (lambda f: f["devices"][0].update(reliability=float("nan")), "devices[0].reliability", "finite"),
        (lambda f: f["sites"][0].update(bandwidth_gbps=float("inf")), "sites[0].bandwidth_gbps", "finite"),
        (lambda f: f["links"][0].update(latency_ms=float("inf")), "links[0].latency_ms", "finite"),
        (lambda f: f["devices"][0].update(memory_gib=1e9), "devices[0].memory_gib", "not plausible"),
        (lambda f: f["devices"][0].update(tflops=1e12), "devices[0].tflops", "not plausible"),
        (lambda f: f["sites"][0].update(bandwidth_gbps=1e-12), "sites[0].bandwidth_gbps", "not plausible"),
    ],
)
def test_non_finite_and_absurd_values_are_refused(tmp_path, capsys, mutate, field, words):
    """`memory_gib: .inf` used to crash the planner with a traceback; infinite tflops wrote a bad plan."""
    data = _fleet()
    mutate(data)
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))  # writes .inf / .nan as YAML does
    code = main(["plan", str(path), "--model", "llama-1b", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr().err
    assert code == 2 and field in captured and words in captured and str(path) in captured
    assert "Traceback" not in captured and not (tmp_path / "out").exists()


def test_a_bad_device_is_reported_alone(tmp_path, capsys):
    """No spurious "Tuple should have at least 1 item" line next to the bad device's own error."""
    data = _fleet()
    data["devices"] = [{**data["devices"][0], "memory_gib": "lots"}]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path), "--model", "llama-1b"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert len(lines) == 1 and "devices[0].memory_gib" in lines[0]
    data["devices"] = []
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path), "--model", "llama-1b"]) == 2
    assert "at least one device is needed" in capsys.readouterr().err
