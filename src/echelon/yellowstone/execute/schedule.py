"""1F1B action orders for a replica's pipeline, including the U shape (one rank, two stages).

Each stage follows 1F1B on its own: min(S - 1 - s, m) warm-up forwards, then one forward and one
backward in turn, then the remaining backwards. A linear pipeline (one stage per rank) runs
`torch.distributed.pipelining.Schedule1F1B`. In a U-shaped replica the cleared cluster runs both
the first stage and the last (the loss head), which torch's single-stage schedules cannot express,
so the two stages' 1F1B sequences are merged into one order per rank by a unit-time list schedule
(the earliest ready action first; a backward before a forward when both are ready) and executed by
`torch.distributed.pipelining`'s runtime for custom schedules (`_PipelineScheduleRuntime`, the
same runtime torchtitan loads CSV schedules into). Merging the per-stage orders of a feasible
global timeline keeps every rank's order deadlock-free.
"""

from __future__ import annotations

from torch.distributed.pipelining.schedules import _Action, _ComputationType

FORWARD, BACKWARD = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD


def stage_order(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The 1F1B sequence of one stage: ("F" | "B", micro-batch) pairs."""
    warmup = min(stages - 1 - stage, micro_batches)
    out = [("F", i) for i in range(warmup)]
    f, b = warmup, 0
    while f < micro_batches:
        out += [("F", f), ("B", b)]
        f, b = f + 1, b + 1
    out += [("B", i) for i in range(b, micro_batches)]
    return out


def rank_orders(stage_rank: list[int], micro_batches: int) -> dict[int, list[_Action]]:
    """Compute-only action lists per rank for stages placed on ranks by `stage_rank`."""
    stages = len(stage_rank)
    queues = {s: stage_order(s, stages, micro_batches) for s in range(stages)}
    done: set[tuple[str, int, int]] = set()
    orders: dict[int, list[_Action]] = {r: [] for r in sorted(set(stage_rank))}

    def ready(s: int) -> bool:
        kind, i = queues[s][0]
        if kind == "F":
            return s == 0 or ("F", s - 1, i) in done
        return ("F", s, i) in done and (s == stages - 1 or ("B", s + 1, i) in done)

    while any(queues.values()):
        finished = []
        for rank in orders:
            candidates = [s for s in range(stages) if stage_rank[s] == rank and queues[s] and ready(s)]
            if not candidates:
                continue
            s = min(candidates, key=lambda s: (queues[s][0][0] != "B", -s))
            kind, i = queues[s].pop(0)
            orders[rank].append(_Action(s, FORWARD if kind == "F" else BACKWARD, i))
            finished.append((kind, s, i))
        if not finished:
            raise RuntimeError(f"no 1F1B order exists for stages on ranks {stage_rank}")
        done.update(finished)
    return orders
