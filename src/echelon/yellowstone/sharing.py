"""Replicas that cross the same link share it: their step times as a fixed point.

Replica r sends bytes_r(h) per step each way over physical link h (`cost.hop_bytes`), so it uses
bytes_r(h) / step_r of the link's bandwidth beta_h on average. A transfer of replica r over h sees
the share the others leave free, 1 - sum_{s != r} bytes_s(h) / (step_s beta_h) (`network.shared`),
which lengthens r's step, which lowers r's use of the link, and so on: the shares are iterated
(damped by half) to a fixed point. Links only one replica crosses keep their whole bandwidth;
inside a site the network is switched and not shared.
"""

from __future__ import annotations

from echelon.yellowstone.cost import CostSettings, Layout, ReplicaCost, Tables, evaluate, hop_bytes
from echelon.yellowstone.network import Hop, Network, SharedNetwork

ITERATIONS = 30
TOLERANCE = 1e-4  # relative change of every step time that ends the iteration


def share_links(
    layouts: list[Layout], tables: Tables, net: Network, settings: CostSettings
) -> list[tuple[ReplicaCost, SharedNetwork]]:
    """Each replica's figures, and the network as it sees it, with shared links slowed."""
    prof, m = tables.profile, settings.micro_batches
    p2p = prof.micro_batch * prof.seq_len * prof.activation_bytes
    loads = [hop_bytes(layout, net, p2p, m) for layout in layouts]
    users: dict[Hop, int] = {}
    for load in loads:
        for h in load:
            users[h] = users.get(h, 0) + 1
    views = [net.shared({}) for _ in layouts]
    costs = [_evaluate(layout, tables, view, settings) for layout, view in zip(layouts, views, strict=True)]
    shared = [r for r, load in enumerate(loads) if any(users[h] > 1 for h in load)]
    free = {r: {h: 1.0 for h in loads[r] if users[h] > 1} for r in shared}
    for _ in range(ITERATIONS if shared else 0):
        rates = [{h: b / c.step_s for h, b in load.items()} for load, c in zip(loads, costs, strict=True)]
        used: dict[Hop, float] = {}
        for rate in rates:
            for h, x in rate.items():
                used[h] = used.get(h, 0.0) + x
        worst = 0.0
        for r in shared:
            for h in free[r]:
                target = 1.0 - (used[h] - rates[r][h]) / net.physical(h).beta
                free[r][h] = 0.5 * free[r][h] + 0.5 * target
            views[r] = net.shared(free[r])
            before = costs[r].step_s
            costs[r] = _evaluate(layouts[r], tables, views[r], settings)
            worst = max(worst, abs(costs[r].step_s / before - 1))
        if worst < TOLERANCE:
            break
    return list(zip(costs, views, strict=True))


def _evaluate(layout: Layout, tables: Tables, net: SharedNetwork, settings: CostSettings) -> ReplicaCost:
    cost = evaluate(layout, tables, net, settings)
    assert cost is not None  # sharing only slows links that exist; memory does not change
    return cost
