"""Privacy red-team (paper §4.3, §8.6, Table 14): attack what the global coordinator saw.

The adversary is the honest-but-curious global coordinator. Its view is exactly what crossed to
it: every boundary's `BoundaryStatus` (per middle step) and `BoundaryDelta` (per outer step, with
Delta_b in the clear, or, under +SA, only the secure sum over boundaries), plus the run file every
party holds (the roster of devices, their profiles, the knobs). `Recorder` records that view
during a simulation, beside the simulator's private ground truth (which device contributed what
to each middle step), kept apart in a clearly private file and used only to score the attacks.
`echelon redteam RUN` checks the view against the run's signed audit log (every message's SHA-256
must be one the global plane logged as received), so the attacks use nothing that did not cross.

The three vectors and their success metrics (docs/fidelity.md has the reasoning). Each vector has
opportunities (every aggregate for SC, every pair of adjacent aggregates over equally long intervals
for DoS, every middle step for MC); the attacker attempts an opportunity when what it knows says the
attack's precondition holds, and an attempt succeeds when its score reaches `threshold` (0.9).
The success rate is successes over opportunities; its chance level is the same attacker's rate
without the per-step metadata (the counts and token totals that crossed), knowing only the run file.
The attacker's count of device rounds in an aggregate is N = round(tokens / tokens of one local
round) from the crossed token count, never above the public bound: the interval's middle steps times
the buffer's capacity (the run file's buffer_size, or the boundary's roster for `boundary`).

- Difference of sums (DoS). For two adjacent aggregates of one boundary over the same number of
  middle steps whose counts differ by one, the attacker takes e = N_k * Delta_k - N_k' * Delta_k' as
  one device's update. Score: the largest cosine similarity of e with the true contribution of a
  device to the larger aggregate. Without metadata the bounds of such a pair are equal: chance 0.
- Small cohort (SC). Every aggregate with N_k <= k is taken as one device's update. Score: the
  largest cosine similarity of the aggregate with a member's true contribution. Without metadata
  the attacker attempts the aggregates whose bound is at most k (e.g. every one under buffer 1).
- Membership churn (MC). For every middle step the attacker guesses who contributed: the c
  fastest devices of the boundary's roster, c from the crossed count (when counts are coarsened,
  a lower bound, raised by what the crossed token totals say, never above the buffer capacity).
  Score: 1 for the exact member set, else 0. Without metadata, c is the buffer capacity.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from google.protobuf.message import Message
from rich.table import Table

from echelon.config import RunConfig
from echelon.contract.slicing import wire_digest
from echelon.errors import UserError
from echelon.planes.boundary import StepMembers
from echelon.planes.coordinator import GlobalPlane
from echelon.sansio import Data
from echelon.tensors import to_tensor
from echelon.v1 import boundary_pb2

VIEW_FILE = Path("redteam") / "coordinator_view.pt"
TRUTH_FILE = Path("private") / "ground_truth.pt"
PRIVATE_NOTE = (
    "Simulator-private ground truth: which device contributed what to every middle step. It never "
    "crossed a boundary and a deployment never produces it; `echelon redteam` uses it only to score "
    "the attacks on the coordinator's view. Do not share it.\n"
)
THRESHOLD = 0.9


def _boundary(address: str) -> str:
    return address.split("/", 1)[1]


@dataclass
class CoordinatorView:
    """What the global coordinator received, per boundary, in arrival order (`hashes`: the
    SHA-256 of every message's wire frames, with its sender's party name)."""

    statuses: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    deltas: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    sums: list[dict] = field(default_factory=list)  # +SA: the secure sum per outer step
    hashes: list[tuple[str, str]] = field(default_factory=list)

    def state(self) -> dict:
        return {
            "statuses": dict(self.statuses),
            "deltas": dict(self.deltas),
            "sums": self.sums,
            "hashes": self.hashes,
        }


@dataclass
class GroundTruth:
    """Per boundary and middle step: each member's contribution eta_mid * w_i * delta_i / sum w."""

    steps: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))

    def state(self) -> dict:
        return {"steps": dict(self.steps)}


class Recorder:
    """A simulation observer that records the coordinator's view and the private ground truth."""

    def __init__(self, cfg: RunConfig) -> None:
        self.middle_lr = cfg.echelon.middle_lr
        self.view, self.truth = CoordinatorView(), GroundTruth()
        self._pending: dict[str, torch.Tensor] = {}

    def received(self, now: float, sender: str, message: Message, data: Data, frames: list[bytes]) -> None:
        b = _boundary(sender)
        digest = wire_digest(frames)  # as the global plane's ingress guard records it
        self.view.hashes.append(("boundary." + b, digest))
        if isinstance(message, boundary_pb2.BoundaryStatus):
            self.view.statuses[b].append(
                {
                    "time": now,
                    "middle_step": message.middle_step,
                    "contributors": message.contributors,
                    "tokens_total": message.tokens_total,
                }
            )
        elif isinstance(message, boundary_pb2.BoundaryDelta):
            vector = to_tensor(message.delta, data) if message.HasField("delta") else None
            self.view.deltas[b].append(
                {
                    "time": now,
                    "outer_step": message.outer_step,
                    "middle_step": message.middle_step,
                    "tokens": message.tokens,
                    "contributors": message.contributors,
                    "vector": vector,
                }
            )

    def submitted(self, now: float, device: str, boundary: str, delta: torch.Tensor) -> None:
        self._pending[device] = delta.clone()

    def aggregated(self, now: float, boundary: str, step: StepMembers) -> None:
        total = sum(step.weights.values())
        contributions = {
            _boundary(d): self.middle_lr * w / total * self._pending[d]
            for d, w in sorted(step.weights.items())
        }
        self.truth.steps[_boundary(boundary)].append(
            {"middle_step": step.middle_step, "members": contributions}
        )

    def outer_step(self, now: float, plane: GlobalPlane) -> None:
        if plane.outer_aggregator is not None and plane.last_pseudo_gradient is not None:
            self.view.sums.append({"outer_step": plane.outer_step, "vector": -plane.last_pseudo_gradient})

    def save(self, run_dir: Path) -> None:
        """Write the view and, apart, the private ground truth into `run_dir`."""
        for rel, obj in ((VIEW_FILE, self.view.state()), (TRUTH_FILE, self.truth.state())):
            (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            torch.save(obj, run_dir / rel)
        (run_dir / TRUTH_FILE).with_name("README.txt").write_text(PRIVATE_NOTE)


def load_recordings(run_dir: Path) -> tuple[dict, dict]:
    """The coordinator's view and the private ground truth recorded in `run_dir`."""
    return (
        torch.load(run_dir / VIEW_FILE, weights_only=True),
        torch.load(run_dir / TRUTH_FILE, weights_only=True),
    )


def _received(run_dir: Path) -> list[dict]:
    """The messages the global plane's audit log records as received, in order."""
    log = run_dir / "audit" / "global.jsonl"
    try:
        lines = log.read_text().splitlines()
    except OSError as e:
        raise UserError(
            f"cannot read {log}: {e.strerror}; the red-team attacks a run's audited view"
        ) from None
    return [
        r
        for r in map(json.loads, lines)
        if r.get("kind") == "message" and r.get("direction") == "in" and r.get("outcome") == "received"
    ]


def check_same_crossings(run_dir: Path, replay_dir: Path) -> None:
    """A replay's global plane received what the run's did: the same senders, message types,
    rounds, quorums and provenances, in order (the frames' bytes differ: each run has its own
    audit chain, whose head every envelope carries). UserError otherwise."""
    fields = ("peer", "message_type", "round_id", "quorum", "provenance")
    run, replay = ([tuple(r[f] for f in fields) for r in _received(d)] for d in (run_dir, replay_dir))
    if run != replay:
        at = next(
            (i for i, (a, b) in enumerate(zip(run, replay, strict=False)) if a != b),
            min(len(run), len(replay)),
        )
        raise UserError(
            f"{run_dir}: replaying its config.yaml crossed other messages than the run did (from message {at} "
            f"of {len(run)}): the run cannot be replayed; attack a run recorded with the red-team's observer"
        )


def check_view_against_audit(view: dict, run_dir: Path) -> int:
    """Every message of the view must be one the global plane's audit log records as received
    from that party, with the same SHA-256; returns the number checked. UserError otherwise."""
    log = run_dir / "audit" / "global.jsonl"
    logged = {(r["peer"], r["payload_sha256"]) for r in _received(run_dir)}
    missing = [h for h in view["hashes"] if tuple(h) not in logged]
    if missing:
        raise UserError(
            f"{run_dir}: {len(missing)} of {len(view['hashes'])} messages of the coordinator's view are not "
            f"in {log} (e.g. from {missing[0][0]}, SHA-256 {missing[0][1][:16]}...): the recording is not this run's"
        )
    return len(view["hashes"])


# ---------------------------------------------------------------- the attacks


@dataclass(frozen=True)
class AttackStats:
    """One vector on a run: its opportunities, the attempts made and their scores' mean and max,
    the success rate (successes over opportunities) and its chance level (the same attacker's rate
    without the per-step metadata)."""

    opportunities: int
    attempts: int
    mean: float | None
    max: float | None
    success_rate: float | None
    chance: float | None

    @classmethod
    def of(cls, attempted: list[float | None], blind: list[bool], threshold: float) -> AttackStats:
        """`attempted`: per opportunity, the attempt's score or None (not attempted); `blind`: per
        opportunity, whether the attacker without metadata succeeds."""
        scores = [s for s in attempted if s is not None]
        n = len(attempted)
        return cls(
            n,
            len(scores),
            float(np.mean(scores)) if scores else None,
            float(np.max(scores)) if scores else None,
            sum(s >= threshold for s in scores) / n if n else None,
            float(np.mean(blind)) if n else None,
        )


@dataclass(frozen=True)
class RedTeamResult:
    dos: AttackStats
    mc: AttackStats
    sc: AttackStats


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    return float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0


def _roster(cfg: RunConfig, boundary: str) -> list[str]:
    """The boundary's devices, fastest first (ties by id): public knowledge from the run file."""
    devices = [d for b, d in cfg.all_devices if b == boundary]
    return [d.id for d in sorted(devices, key=lambda d: (-d.tokens_per_s, d.id))]


def _capacity(cfg: RunConfig, boundary: str) -> int:
    """The most devices one of the boundary's middle steps aggregates, by the run file."""
    roster = len(_roster(cfg, boundary))
    buffer = cfg.echelon.buffer_size
    return roster if buffer == "boundary" else min(buffer, roster)


@dataclass
class Aggregate:
    """One aggregate the coordinator saw: its interval, the attacker's count of device rounds in
    it (from the crossed tokens, capped by `bound`), the public bound on that count (middle steps
    times the buffer's capacity) and the truth behind it."""

    vector: torch.Tensor
    steps: int
    count: int
    bound: int
    truth: dict[str, torch.Tensor]  # device -> its contribution to this aggregate


def _contributions(steps: list[dict], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Each device's summed contribution to the middle steps lo < step <= hi."""
    out: dict[str, torch.Tensor] = {}
    for s in steps:
        if lo < s["middle_step"] <= hi:
            for device, v in s["members"].items():
                out[device] = out[device] + v if device in out else v
    return out


def aggregates(cfg: RunConfig, view: dict, truth: dict) -> dict[str, list[Aggregate]]:
    """Each boundary's aggregates as the coordinator saw them, in order, with the truth behind
    them; under +SA the one sequence of secure sums (omega_b from the crossed token counts)."""
    per_round = cfg.tokens_per_round
    out: dict[str, list[Aggregate]] = {}
    reports: dict[int, list[tuple[dict, dict[str, torch.Tensor], int]]] = defaultdict(list)
    for b, deltas in view["deltas"].items():
        previous, seen = 0, []
        for d in deltas:
            contributions = _contributions(truth["steps"].get(b, []), previous, d["middle_step"])
            bound = (d["middle_step"] - previous) * _capacity(cfg, b)
            reports[d["outer_step"]].append((d, contributions, bound))
            if d["vector"] is not None and contributions:
                count = min(bound, round(d["tokens"] / per_round))
                seen.append(Aggregate(d["vector"], d["middle_step"] - previous, count, bound, contributions))
            previous = d["middle_step"]
        out[b] = seen
    if not view["sums"]:
        return out
    sums = []
    for s in view["sums"]:
        parts = reports.get(s["outer_step"], [])
        total = sum(d["tokens"] for d, _, _ in parts)
        contributions = {
            device: d["tokens"] / total * v for d, c, _ in parts if total for device, v in c.items()
        }
        if contributions:
            steps = sum(d["middle_step"] for d, _, _ in parts)  # the intervals' lengths, as a label
            bound = sum(b for _, _, b in parts)
            count = min(bound, round(total / per_round))
            sums.append(Aggregate(s["vector"], steps, count, bound, contributions))
    return {"(secure sum)": sums}


def _dos_pair(a: Aggregate, b: Aggregate, count_a: int | None, count_b: int | None) -> float | None:
    if count_a is None or count_b is None or abs(count_a - count_b) != 1:
        return None
    (big, n_big), (small, n_small) = sorted(((a, count_a), (b, count_b)), key=lambda x: -x[1])
    estimate = n_big * big.vector - n_small * small.vector
    return max(_cos(estimate, v) for v in big.truth.values())


def difference_of_sums(seen: list[Aggregate], threshold: float = THRESHOLD) -> tuple[list, list[bool]]:
    """Per opportunity (adjacent aggregates over equally long intervals): the DoS score when the
    counts differ by one, else None; and whether the attack succeeds on the public bounds alone."""
    attempted, blind = [], []
    for a, b in itertools.pairwise(seen):
        if a.steps != b.steps:
            continue
        attempted.append(_dos_pair(a, b, a.count, b.count))
        score = _dos_pair(a, b, a.bound, b.bound)
        blind.append(score is not None and score >= threshold)
    return attempted, blind


def small_cohort(seen: list[Aggregate], k: int, threshold: float = THRESHOLD) -> tuple[list, list[bool]]:
    """Per aggregate: the SC score when its count is at most k, else None; and whether the attack
    succeeds on the public bound alone."""
    attempted, blind = [], []
    for a in seen:
        score = max(_cos(a.vector, v) for v in a.truth.values())
        attempted.append(score if 0 < a.count <= k else None)
        blind.append(a.bound <= k and score >= threshold)
    return attempted, blind


def membership(cfg: RunConfig, view: dict, truth: dict) -> tuple[list[float], list[bool]]:
    """MC scores per (boundary, middle step), and the same guess's success without the metadata."""
    per_round = cfg.tokens_per_round
    exact = cfg.echelon.privacy.status_counts == "exact"
    scores, prior = [], []
    for b, steps in truth["steps"].items():
        roster, capacity = _roster(cfg, b), _capacity(cfg, b)
        statuses = {s["middle_step"]: s for s in view["statuses"].get(b, [])}
        last_total = 0
        for s in steps:
            status = statuses.get(s["middle_step"])
            if status is None:
                continue
            if exact:
                count = status["contributors"]
            else:
                # Counts are lower bounds; the token totals, in quanta, give an estimate when they moved.
                moved = status["tokens_total"] - last_total
                estimate = round(moved / per_round) if moved else capacity
                count = min(capacity, max(status["contributors"], estimate))
            last_total = status["tokens_total"]
            members = set(s["members"])
            scores.append(float(set(roster[: max(1, count)]) == members))
            prior.append(set(roster[:capacity]) == members)
    return scores, prior


def attack(
    cfg: RunConfig, view: dict, truth: dict, *, threshold: float = THRESHOLD, sc_k: int = 1
) -> RedTeamResult:
    """Run the three attacks on a run's coordinator view, scored against the ground truth."""
    dos: tuple[list, list[bool]] = ([], [])
    sc: tuple[list, list[bool]] = ([], [])
    for seen in aggregates(cfg, view, truth).values():
        for acc, (tried, blind) in (
            (dos, difference_of_sums(seen, threshold)),
            (sc, small_cohort(seen, sc_k, threshold)),
        ):
            acc[0].extend(tried)
            acc[1].extend(blind)
    mc, prior = membership(cfg, view, truth)
    return RedTeamResult(
        dos=AttackStats.of(*dos, threshold),
        mc=AttackStats.of(list(mc), prior, threshold),
        sc=AttackStats.of(*sc, threshold),
    )


def describe_mitigations(cfg: RunConfig) -> str:
    """The run's mitigations in a few words: `none`, `all`, or which are on."""
    p, e = cfg.echelon.privacy, cfg.echelon
    on = [
        f"window {p.membership_window}" if p.membership_window else "",
        "shuffle" if p.shuffle else "",
        p.status_counts if p.status_counts != "exact" else "",
        "buffer = all" if e.buffer_size == "boundary" else "",
    ]
    on = [m for m in on if m]
    return "all" if len(on) == 4 else ", ".join(on) or "none"


def fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def table14(rows: list[tuple[str, RunConfig, RedTeamResult]]) -> Table:
    """Table 14: per run, its boundaries, quorum, buffer and mitigations, then per vector the
    attempts made of its opportunities, their scores' mean and max, the success rate (successes
    over opportunities) and its chance level (the same attacker without per-step metadata)."""
    table = Table(
        title="Table 14: privacy red-team from the global coordinator's seat",
        caption="tried: attempts / opportunities (aggregates for SC, adjacent equal-interval pairs for DoS, "
        "middle steps for MC); mean, max: the attempts' scores; success: successes / opportunities (score "
        ">= the threshold); chance: the same attacker's success without the per-step metadata (the run file "
        "only); — : no attempt or no opportunity",
        caption_justify="left",
    )
    table.add_column("run", no_wrap=True)
    for col in ("b", "q", "buffer"):
        table.add_column(col, justify="right")
    table.add_column("mitigations", no_wrap=True)
    for vector in ("DoS", "MC", "SC"):
        for col in ("tried", "mean", "max", "success", "chance"):
            table.add_column(f"{vector} {col}", justify="right")
    for name, cfg, r in rows:
        e = cfg.echelon
        cells = [
            name,
            str(len(cfg.boundaries)),
            str(e.min_quorum),
            str(e.buffer_size),
            describe_mitigations(cfg),
        ]
        for stats in (r.dos, r.mc, r.sc):
            cells += [
                f"{stats.attempts}/{stats.opportunities}",
                fmt(stats.mean),
                fmt(stats.max),
                fmt(stats.success_rate),
                fmt(stats.chance),
            ]
        table.add_row(*cells)
    return table
