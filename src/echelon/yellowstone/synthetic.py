"""Random but plausible fleets for tests and benchmarks, reproducible from a seed.

Devices are drawn from a catalogue of real cards (memory in GiB, achieved bf16 TFLOP/s); sites
get a local network, every pair of sites a link (some slow), and about a third of the devices are
cleared for their boundary's data tier.
"""

from __future__ import annotations

import numpy as np

from echelon.yellowstone.fleet import Fleet
from echelon.yellowstone.model_profile import ModelShape

CATALOGUE: tuple[tuple[str, float, float], ...] = (
    ("a100-80", 80, 180),
    ("a100-40", 40, 160),
    ("a6000", 48, 110),
    ("l4", 24, 60),
    ("rtx4090", 24, 90),
    ("rtx3090", 24, 45),
    ("rtx3060", 12, 18),
    ("t4", 16, 20),
    ("orin", 16, 8),
)
TIERS = ("public", "internal", "restricted")

# A small decoder whose units are big enough that memory decides placement (about 18 GiB of
# full-training state over 6 units): used where the exhaustive search must stay cheap.
SMALL_SHAPE = ModelShape(hidden=4096, layers=4, heads=32, kv_heads=8, ffn=14336, vocab=32000, head_dim=128)


def random_fleet(
    devices: int,
    seed: int,
    *,
    sites: int | None = None,
    boundaries: int = 1,
    cleared_fraction: float = 0.35,
    memory_scale: float = 1.0,
) -> Fleet:
    """A fleet of `devices` devices over `sites` sites (default: about one per 12 devices)."""
    rng = np.random.default_rng(seed)
    n_sites = sites or max(1, round(devices / 12))
    site_list = [
        {"id": f"s{i}", "bandwidth_gbps": float(rng.choice([10, 25, 100, 200])), "latency_ms": 0.05}
        for i in range(n_sites)
    ]
    links = [
        {
            "sites": [f"s{a}", f"s{b}"],
            "bandwidth_gbps": float(rng.choice([1, 10, 25, 50])),
            "latency_ms": float(rng.choice([0.2, 1, 5])),
        }
        for a in range(n_sites)
        for b in range(a + 1, n_sites)
    ]
    kinds = rng.integers(len(CATALOGUE), size=devices)
    dev = []
    for i, k in enumerate(kinds):
        name, mem, tflops = CATALOGUE[k]
        cleared = i == 0 or rng.random() < cleared_fraction
        dev.append(
            {
                "id": f"{name}-{i}",
                "boundary": f"b{i % boundaries}",
                "site": f"s{rng.integers(n_sites)}",
                "memory_gib": mem * memory_scale,
                "tflops": tflops,
                "access_tier": "restricted" if cleared else str(rng.choice(TIERS[:2])),
                "reliability": float(rng.choice([0.9, 0.95, 0.99])),
            }
        )
    return Fleet.model_validate(
        {
            "name": f"random-{devices}-{seed}",
            "access_tiers": list(TIERS),
            "boundaries": [{"id": f"b{i}", "data_tier": "restricted"} for i in range(boundaries)],
            "sites": site_list,
            "links": links,
            "devices": dev,
        }
    )
