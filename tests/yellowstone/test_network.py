"""The network model: routes over several links, and links shared by replicas."""

from __future__ import annotations

import pytest

from echelon.yellowstone.cost import CostSettings, Device, Layout, Tables, evaluate, make_cluster
from echelon.yellowstone.fleet import GIB, Fleet
from echelon.yellowstone.model_profile import build_profile
from echelon.yellowstone.network import Network
from echelon.yellowstone.planner import plan_fleet
from echelon.yellowstone.sharing import share_links
from echelon.yellowstone.synthetic import SMALL_SHAPE

SMALL = build_profile("small", SMALL_SHAPE, trainable="full", seq_len=1024, micro_batch=4)
MESSAGE = SMALL.micro_batch * SMALL.seq_len * SMALL.activation_bytes  # 32 MiB


def _fleet(
    links: list[dict], devices: list[dict] | None = None, sites: tuple[str, ...] = ("a", "b", "c")
) -> Fleet:
    return Fleet.model_validate(
        {
            "name": "net",
            "access_tiers": ["public", "restricted"],
            "boundaries": [{"id": "b0", "data_tier": "restricted"}],
            "sites": [{"id": s, "bandwidth_gbps": 100, "latency_ms": 0.01} for s in sites],
            "links": links,
            "devices": devices
            or [
                {
                    "id": "d0",
                    "boundary": "b0",
                    "site": "a",
                    "memory_gib": 80,
                    "tflops": 100,
                    "access_tier": "restricted",
                }
            ],
        }
    )


def test_a_route_crosses_sites_where_no_link_is_direct():
    net = Network(
        _fleet(
            [
                {"sites": ["a", "b"], "bandwidth_gbps": 10, "latency_ms": 1},
                {"sites": ["b", "c"], "bandwidth_gbps": 40, "latency_ms": 2},
            ]
        ),
        MESSAGE,
    )
    assert net.route("a", "c") == ("a", "b", "c") and net.route("c", "a") == ("c", "b", "a")
    link = net.link("a", "c")
    assert link is not None and link.alpha == pytest.approx(0.003) and link.beta == pytest.approx(10e9 / 8)
    assert net.hops("a", "c") == (("a", "b"), ("b", "c"))


def test_no_path_is_no_route():
    net = Network(_fleet([{"sites": ["a", "b"], "bandwidth_gbps": 10}]), MESSAGE)
    assert net.link("a", "c") is None and net.route("a", "c") is None and net.hops("a", "c") == ()


def test_the_route_is_the_fastest_for_the_message():
    links = [
        {"sites": ["a", "c"], "bandwidth_gbps": 1, "latency_ms": 0.1},
        {"sites": ["a", "b"], "bandwidth_gbps": 100, "latency_ms": 1},
        {"sites": ["b", "c"], "bandwidth_gbps": 100, "latency_ms": 1},
    ]
    big, tiny = Network(_fleet(links), MESSAGE), Network(_fleet(links), 1000.0)
    assert big.route("a", "c") == ("a", "b", "c")  # 32 MiB: 2.3 ms via b against 268 ms direct
    assert tiny.route("a", "c") == ("a", "c")  # 1 kB: 0.1 ms direct against 2 ms via b
    for net, size in ((big, MESSAGE), (tiny, 1000.0)):
        chosen = net.link("a", "c").p2p(size)
        assert chosen <= min(net.physical(("a", "c")).p2p(size), 0.002 + size / (100e9 / 8)) + 1e-12


def _replica(net: Network, site: str) -> Layout:
    """A two-cluster U-shaped replica of 80 GiB, 100 TFLOP/s devices from site a to `site`."""

    def cluster(s: str):
        d = Device(f"{s}-gpu", s, 100e12, 72 * GIB, 80 * GIB, True, 0.99)
        return make_cluster((d,), net.link(s, s), SMALL)

    return Layout((cluster("a"), cluster(site)), "U", ((0, 3), (3, len(SMALL.units) - 1)))


def test_replicas_crossing_one_link_share_it():
    net = Network(_fleet([{"sites": ["a", "b"], "bandwidth_gbps": 1, "latency_ms": 1}]), MESSAGE)
    tables, settings = Tables(SMALL), CostSettings(micro_batches=4)
    alone = evaluate(_replica(net, "b"), tables, net, settings)
    assert alone is not None
    ((single, _),) = share_links([_replica(net, "b")], tables, net, settings)
    assert single.step_s == pytest.approx(alone.step_s)  # a link used by one replica is all its own
    both = share_links([_replica(net, "b"), _replica(net, "b")], tables, net, settings)
    for cost, view in both:
        assert cost.step_s > alone.step_s * 1.01
        assert view.link("a", "b").beta < net.link("a", "b").beta
    # at the fixed point the two replicas together use no more than the link carries
    used = sum(2 * 4 * MESSAGE / cost.step_s for cost, _ in both)  # each crosses a->b twice a micro-batch
    assert used <= net.physical(("a", "b")).beta * 1.02


def test_plans_route_stage_edges_over_several_links():
    devices = [
        {
            "id": "a0",
            "boundary": "b0",
            "site": "a",
            "memory_gib": 16,
            "tflops": 100,
            "access_tier": "restricted",
        },
        {"id": "c0", "boundary": "b0", "site": "c", "memory_gib": 80, "tflops": 100, "access_tier": "public"},
    ]
    fleet = _fleet(
        [
            {"sites": ["a", "b"], "bandwidth_gbps": 100, "latency_ms": 0.1},
            {"sites": ["b", "c"], "bandwidth_gbps": 100, "latency_ms": 0.1},
        ],
        devices,
    )
    plan = plan_fleet(fleet, SMALL, CostSettings(micro_batches=4))
    edges = [e for r in plan.boundaries[0].replicas for e in r.edges if e.src_site != e.dst_site]
    assert edges and all(e.route in (["a", "b", "c"], ["c", "b", "a"]) for e in edges)
    assert all(c.ok for c in plan.checks)
