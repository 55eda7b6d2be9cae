"""--explain agrees with its own numbers; the renderings say what they leave out; the loss head's
memory is budgeted as a stock cross-entropy needs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from echelon.yellowstone.cost import CostSettings, Tables, loss_bytes_per_token
from echelon.yellowstone.fleet import load_fleet
from echelon.yellowstone.model_profile import PRESETS, build_profile
from echelon.yellowstone.plan import Plan
from echelon.yellowstone.planner import plan_fleet
from echelon.yellowstone.render import SHOW_REPLICAS, left_out, render_text
from echelon.yellowstone.synthetic import SMALL_SHAPE, random_fleet

EXAMPLES = Path(__file__).parents[2] / "examples" / "fleets"
GIB = r"([\d,.]+) GiB"


@pytest.fixture(scope="module")
def lab() -> Plan:
    """Two hospitals: checkpointing where plain DDP does not fit, radiology workstations on standby."""
    fleet = load_fleet(EXAMPLES / "hospital_pair.yaml")
    return plan_fleet(fleet, build_profile("llama-8b", PRESETS["llama-8b"], trainable="lora"))


def _gib(text: str) -> float:
    return float(text.replace(",", ""))


def test_mode_reasons_agree_with_their_numbers(lab):
    """The FSDP reason once cited 13.0 GiB of state against 21.6 GiB usable as "does not fit"."""
    lines = [line for line in lab.explain if re.search(r"/c\d+ \(", line)]
    assert lines
    for line in lines:
        need, usable = re.search(rf"needs {GIB} of {GIB} usable", line).groups()
        assert _gib(need) <= _gib(usable)
        for need, usable in re.findall(rf"would need {GIB} of {GIB}", line):
            assert _gib(need) > _gib(usable)
    assert any("would be faster" in line for line in lines)


def test_standby_claims_match_the_backups(lab):
    backs = {(x.standby, x.device) for b in lab.boundaries for x in b.backups if x.standby}
    for line in lab.explain:
        found = re.search(r"standby (\S+) backs up (.*)", line)
        if found:
            named = [d for d in re.split(r", | and ", found.group(2)) if not d.endswith("more")]
            assert all((found.group(1), d) in backs for d in named)
    idle = [s for b in lab.boundaries for s in b.standby if not any(s == x for x, _ in backs)]
    assert idle and any("back up no device" in line and idle[0] in line for line in lab.explain)


def test_every_standby_device_is_explained_with_numbers(lab):
    for name in (s for b in lab.boundaries for s in b.standby):
        assert any(
            name in line and re.search(r"tokens/s|GiB", line) and "stay on standby" in line
            for line in lab.explain
        )


def test_large_plans_say_what_they_leave_out():
    small = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
    fleet = random_fleet(12, 1, sites=1, cleared_fraction=1.0, memory_scale=2)  # a replica per device
    plan = plan_fleet(fleet, small, CostSettings(micro_batches=4), budget=100)
    replicas = len(plan.boundaries[0].replicas)
    assert replicas > SHOW_REPLICAS
    console = Console(record=True, width=200)
    render_text(plan, console)
    assert f"not shown: {replicas - SHOW_REPLICAS} more replicas" in console.export_text()
    assert any(f"{replicas - SHOW_REPLICAS} replicas" in x for x in left_out(plan))  # the diagram's footer


def test_the_loss_head_is_budgeted_as_cross_entropy_runs():
    """Logits in the training dtype, their float32 copy and its gradient: about 10 bytes in bf16."""
    bf16 = build_profile("llama-8b", PRESETS["llama-8b"], dtype="bf16")
    fp32 = build_profile("llama-8b", PRESETS["llama-8b"], dtype="fp32")
    vocab = bf16.shape.vocab
    assert loss_bytes_per_token(bf16) == 10 * vocab and loss_bytes_per_token(fp32) == 12 * vocab
    head = Tables(bf16).units[-1]
    assert head.kind == "head" and head.stash == bf16.activation_bytes + 10 * vocab
    # a micro-batch of 4 x 2048 tokens on one device: 10 GiB of logits alone
    assert head.stash * 4 * 2048 / 2**30 > 9.7
