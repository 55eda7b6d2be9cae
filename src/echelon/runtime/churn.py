"""Who cycles, drawn once for both runtimes: the simulator and a deployment pick the same devices.

With `churn.mean_uptime_s` set, a seeded share (`churn.cycling_fraction`) of the initial
membership goes offline after exponential uptimes and comes back after exponential downtimes;
devices that join later (`churn.joins`) never cycle. Each device's uptimes and downtimes come
from its own generator, `derived_seed(seed, 3, rank)`, rank its place among every device's sorted
address (those that join later included).
"""

from __future__ import annotations

import numpy as np

from echelon.config import ChurnConfig
from echelon.train.trainer import derived_seed


def cycling_devices(churn: ChurnConfig, initial: list[str], seed: int) -> set[str]:
    """The addresses among `initial` (the initial membership's device addresses) that cycle."""
    if churn.mean_uptime_s is None:
        return set()
    devices = sorted(initial)
    count = max(1, round(churn.cycling_fraction * len(devices)))
    rng = np.random.default_rng(derived_seed(seed, 5))
    return {devices[i] for i in rng.choice(len(devices), size=count, replace=False)}


def churn_rngs(devices: list[str], seed: int) -> dict[str, np.random.Generator]:
    """Each device address's generator of uptimes and downtimes; `devices`: every device's address."""
    return {d: np.random.default_rng(derived_seed(seed, 3, i)) for i, d in enumerate(sorted(devices))}
