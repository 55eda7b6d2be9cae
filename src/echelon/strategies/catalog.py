"""The registered strategies. Adding one is adding an entry here.

Echelon's own strategies are hierarchical and admissible. The baselines run on the same planes:
flat ones make every device its own aggregation point, so each device's update crosses its
boundary alone (not admissible: simulation only); DiLoCo+SA also has its admissible form, where
each boundary is one DiLoCo worker whose devices aggregate inside it.
"""

from __future__ import annotations

from echelon.strategies.base import Strategy

NO_PROXIMAL = {"echelon.proximal_mu": 0.0}
# lr 1, momentum 0: the server averages (FedAvg's outer step).
AVERAGING = {"echelon.outer.lr": 1.0, "echelon.outer.momentum": 0.0}
# Everyone waits for the outer step, so nothing overlaps it.
NO_OVERLAP = {"echelon.sync.overlap": False}

CATALOG: tuple[Strategy, ...] = (
    Strategy("echelon", "boundary aggregates, fixed outer interval H", admissible=True),
    Strategy(
        "echelon-da",
        "Echelon with the drift-aware cadence H = min_b H_b",
        admissible=True,
        cadence="drift_aware",
    ),
    Strategy(
        "echelon+sa",
        "Echelon with the boundaries' Delta_b securely aggregated at the global plane",
        admissible=True,
        secure_outer=True,
    ),
    Strategy(
        "echelon-da+sa",
        "Echelon-DA with the boundaries' Delta_b securely aggregated at the global plane",
        admissible=True,
        cadence="drift_aware",
        secure_outer=True,
    ),
    Strategy(
        "echelon-sync",
        "Echelon in lockstep: every boundary does H middle steps, then the outer step (reproducible)",
        admissible=True,
        schedule="lockstep",
        fixes=NO_OVERLAP,
    ),
    Strategy(
        "diloco+sa",
        "DiLoCo with every device's update securely aggregated across boundaries (privacy parity)",
        admissible=False,
        topology="flat",
        schedule="lockstep",
        secure_outer=True,
        fixes=NO_PROXIMAL | NO_OVERLAP,
    ),
    Strategy(
        "diloco+sa-boundary",
        "DiLoCo+SA in its admissible form: each boundary is one DiLoCo worker whose devices aggregate "
        "inside it (SecAgg+), and the outer round over the boundaries is SecAgg+",
        admissible=True,
        schedule="lockstep",
        secure_outer=True,
        fixes=NO_PROXIMAL | NO_OVERLAP,
    ),
    Strategy(
        "centralised",
        "one worker, all the data and compute (upper reference)",
        admissible=False,
        topology="centralised",
        schedule="lockstep",
        fixes=NO_PROXIMAL | AVERAGING | NO_OVERLAP,
    ),
    Strategy(
        "fedavg",
        "every device's model averaged each round",
        admissible=False,
        topology="flat",
        schedule="lockstep",
        fixes=NO_PROXIMAL | AVERAGING | NO_OVERLAP,
    ),
    Strategy(
        "fedprox",
        "FedAvg with the proximal term towards the round's reference",
        admissible=False,
        topology="flat",
        schedule="lockstep",
        fixes=AVERAGING | NO_OVERLAP,
    ),
    Strategy(
        "scaffold",
        "FedAvg with SCAFFOLD control variates (option II)",
        admissible=False,
        topology="flat",
        schedule="lockstep",
        local="scaffold",
        # Control variates have no declared range for fixed-point encoding: the plain sum.
        fixes=NO_PROXIMAL | AVERAGING | NO_OVERLAP | {"echelon.aggregation": "plain"},
    ),
    Strategy(
        "diloco",
        "per-device inner steps, outer Nesterov on the devices' pseudo-gradients",
        admissible=False,
        topology="flat",
        schedule="lockstep",
        fixes=NO_PROXIMAL | NO_OVERLAP,
    ),
    Strategy(
        "streaming-diloco",
        "DiLoCo syncing strided layer fragments in turn every H/P steps, overlapped, merged, in bfloat16 "
        "(Douillard et al. 2025)",
        admissible=False,
        topology="flat",
        schedule="barrier",
        fixes=NO_PROXIMAL,
        # The settings of Douillard et al. (2025) where the run file leaves them unset.
        defaults={
            "echelon.streaming.fragments": 4,
            "echelon.streaming.overlap_steps": 1,
            "echelon.streaming.mixing": 0.5,
            "echelon.streaming.pseudo_gradient_dtype": "bfloat16",
        },
    ),
    Strategy(
        "drift-diloco",
        "DiLoCo with the drift-aware cadence over devices",
        admissible=False,
        topology="flat",
        cadence="drift_aware",
        schedule="lockstep",
        fixes=NO_PROXIMAL | NO_OVERLAP,
    ),
)
