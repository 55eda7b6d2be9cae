"""Contract figures: what the guards cost, and every attack on them refused and recorded.

1. Cost per message and per MB: a BoundaryStatus, and a BoundaryDelta of --megabytes (minted by a
   boundary model from a sealed round), through the boundary's EgressGuard and the global plane's
   IngressGuard (every check: unknown fields at every depth, the canonical encoding, the flow
   class of every nested message, max_bytes/max_count, the sender table, dimensions, the mint
   ledger, typed slicing and reassembly), against the baseline of serialising and parsing the
   same envelope. Audit records are left out (in-memory sink): benchmarks/audit.py measures them.
2. Cost in a run: the demo run file (token budget --tokens) simulated in this process, the time
   inside the guards divided by the run's wall time. Target < 1%.
3. Every route around the guard found by the adversarial review (issue 12), sent as the attack:
   refused (ContractViolation, or the provenance seal) and recorded (a refused audit record).

    .venv/bin/python benchmarks/contract.py [--tokens 100000] [--megabytes 32] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from google.protobuf.internal import encoder
from rich.console import Console
from rich.table import Table

from echelon.assembly import prepare
from echelon.commands.demo import demo_config
from echelon.contract.guard import ContractViolation, EgressGuard, IngressGuard
from echelon.contract.policy import Terms
from echelon.contract.provenance import AggregateResult, BoundaryModel, UnsealedResult
from echelon.runner import build_simulation
from echelon.strategies import effective_config
from echelon.tensors import encode, payload
from echelon.v1 import boundary_pb2, secagg_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES

QUORUM = 2


class Sink:
    """An in-memory audit sink with a chain head, so the guards do all their work but the I/O."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.heads: set[tuple[str, int]] = set()  # (peer, seq) of every head countersigned

    def append(self, **fields: object) -> dict:
        self.records.append(fields)
        if isinstance(seq := fields["peer_seq"], int):
            self.heads.add((str(fields["peer"]), seq))
        return fields

    def head(self) -> tuple[int, str]:
        return len(self.records), hashlib.sha256(len(self.records).to_bytes(8, "little")).hexdigest()

    def countersigned(self, peer: str, seq: int) -> bool:
        return (peer, seq) in self.heads


def minted(dim: int) -> tuple[boundary_pb2.BoundaryDelta, BoundaryModel]:
    """A BoundaryDelta of `dim` float32 elements, minted by a boundary model from a sealed round."""
    model = BoundaryModel(torch.zeros(dim), QUORUM)
    values = np.random.default_rng(0).standard_normal(dim)
    model.apply_aggregate(model.open_round(1, QUORUM).seal(values, 1.0, QUORUM), lr=1.0)
    body = boundary_pb2.BoundaryDelta(
        outer_step=1, tokens=dim, contributors=QUORUM, delta=model.delta_payload()
    )
    return body, model


def _median_s(f: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _crossing(body, terms: Terms, ledger, reps: int, batch: int) -> tuple[float, float]:
    """Median seconds for `body` through the boundary's egress and the global plane's ingress
    guard, and for the baseline: serialising and parsing the same envelope (`batch` a run)."""
    egress = EgressGuard("boundary.b0", terms, Sink(), ledger)
    ingress = IngressGuard("global", terms, Sink())
    field = CROSS_BOUNDARY_BODIES[body.DESCRIPTOR.full_name]
    envelope = boundary_pb2.CrossBoundaryEnvelope(boundary_id="b0", **{field: body})

    def guarded() -> None:
        for _ in range(batch):
            for frame in egress.send(0.0, body, "global"):
                ingress.receive(0.0, frame, "boundary.b0")

    def baseline() -> None:
        for _ in range(batch):
            boundary_pb2.CrossBoundaryEnvelope.FromString(envelope.SerializeToString())

    return _median_s(guarded, reps) / batch, _median_s(baseline, reps) / batch


def per_message(reps: int) -> dict:
    """Seconds per small message through both guards, and the serialise + parse baseline."""
    body = boundary_pb2.BoundaryStatus(middle_step=7, drift=0.3, update_norm=0.1, tokens=4096, contributors=2)
    guard_s, base_s = _crossing(body, Terms(QUORUM, 16), None, reps, 100)
    size = len(EgressGuard("boundary.b0", Terms(QUORUM, 16), Sink()).send(0.0, body, "global")[0])
    return {"guard_s": guard_s, "base_s": base_s, "bytes": size}


def per_megabyte(megabytes: float, reps: int) -> dict:
    """Seconds per MB of a large aggregate through both guards (sliced, checked, reassembled),
    and the serialise + parse baseline of the same envelope."""
    dim = int(megabytes * 1e6) // 4
    body, model = minted(dim)
    guard_s, base_s = _crossing(body, Terms(QUORUM, dim), model.ledger, reps, 1)
    mb = dim * 4 / 1e6
    return {"guard_s": guard_s / mb, "base_s": base_s / mb, "mb": mb}


def in_a_run(tokens: int, smoke: bool = False) -> dict:
    """Wall time of the demo run simulated (`smoke`: its small form), and the time inside its guards."""
    cfg = effective_config(demo_config(tokens, smoke))
    spent = [0.0]
    messages = [0]
    send, receive = EgressGuard.send, IngressGuard.receive

    def timed(method):
        def wrapper(self, *args):
            t0 = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                spent[0] += time.perf_counter() - t0
                messages[0] += 1

        return wrapper

    t0 = time.perf_counter()
    EgressGuard.send, IngressGuard.receive = timed(send), timed(receive)
    try:
        prep = prepare(cfg)
        sim = build_simulation(cfg, prep, lambda kind, fields: None)
        sim.run(cfg.budget)
    finally:
        EgressGuard.send, IngressGuard.receive = send, receive
    wall = time.perf_counter() - t0
    return {"wall": wall, "guard": spent[0], "calls": messages[0], "bytes": sim.cross_boundary_bytes}


# The attacks. Each returns (refused, recorded). -----------------------------------------------------

DIM = 64
TERMS = Terms(QUORUM, DIM, boundaries=2)


def _field(number: int, data: bytes) -> bytes:
    return encoder._VarintBytes(number << 3 | 2) + encoder._VarintBytes(len(data)) + data


def _head() -> bytes:
    return boundary_pb2.AuditHead(seq=3, hash=bytes(32)).SerializeToString()


def _envelope(**body: object) -> boundary_pb2.CrossBoundaryEnvelope:
    env = boundary_pb2.CrossBoundaryEnvelope(boundary_id="b0", **body)
    env.audit_head.seq, env.audit_head.hash = 3, bytes(32)
    return env


def _ring(numel: int, dtype: int = tensor_pb2.UINT32, contributors: int = QUORUM) -> tensor_pb2.TensorPayload:
    return tensor_pb2.TensorPayload(
        provenance=tensor_pb2.BOUNDARY_AGGREGATE,
        contributors=contributors,
        dtype=dtype,
        numel=numel,
        data=bytes(numel * (4 if dtype == tensor_pb2.UINT32 else 8)),
    )


def _outer(**secagg: object) -> bytes:
    message = secagg_pb2.SecAggMessage(round_id=1, **secagg)
    return _envelope(
        outer_aggregation=boundary_pb2.OuterAggregation(outer_step=1, secagg=message)
    ).SerializeToString()


def _received(frames: list[bytes], party: str = "global", peer: str = "boundary.b0", terms: Terms = TERMS):
    def attack() -> tuple[bool, bool]:
        sink = Sink()
        guard = IngressGuard(party, terms, sink)
        try:
            for frame in frames:
                guard.receive(0.0, frame, peer)
        except ContractViolation:
            return True, sink.records[-1]["outcome"] == "refused"
        return False, False

    return attack


def _sent(body, party: str = "boundary.b0", peer: str = "global", ledger=None):
    def attack() -> tuple[bool, bool]:
        sink = Sink()
        try:
            EgressGuard(party, TERMS, sink, ledger).send(0.0, body, peer)
        except ContractViolation:
            return True, sink.records[-1]["outcome"] == "refused"
        return False, False

    return attack


def _laundered() -> tuple[bool, bool]:
    """One device's delta into apply_aggregate with a claimed count: refused by the seal (raised,
    nothing folded in; no message, so nothing to record: the boundary never holds an aggregate)."""
    model = BoundaryModel(torch.zeros(DIM), QUORUM)
    try:
        model.apply_aggregate(AggregateResult(1, np.ones(DIM), 1.0, 5, b""), lr=1.0)
    except UnsealedResult:
        return True, model.delta_payload() is None
    return False, False


def _sliced_two_types() -> list[bytes]:
    dim = (1 << 20) // 2
    body, model = minted(dim)
    terms = Terms(QUORUM, dim)
    first = EgressGuard("boundary.b0", terms, Sink(), model.ledger).send(0.0, body, "global")[0]
    masked = secagg_pb2.SecAggMessage(
        round_id=1, masked_input=secagg_pb2.SecAggMaskedInput(masked=_ring(dim))
    )
    outer = boundary_pb2.OuterAggregation(outer_step=1, secagg=masked)
    second = EgressGuard("boundary.b0", terms, Sink()).send(0.0, outer, "global")[1]
    return [first, second]


def attacks() -> list[tuple[str, str, Callable[[], tuple[bool, bool]]]]:
    delta = np.random.default_rng(1).standard_normal(20_000).astype("<f4").tobytes()  # 80 KB
    status = boundary_pb2.BoundaryStatus(middle_step=1).SerializeToString() + _field(99, delta)
    cadence = boundary_pb2.CadenceUpdate(interval=3).SerializeToString()
    cadence += _field(7, encode(np.frombuffer(delta, "<f4"), tensor_pb2.DEVICE).SerializeToString())
    smuggled_status = boundary_pb2.BoundaryStatus(middle_step=1)
    smuggled_status.MergeFromString(_field(99, delta))
    canonical = _envelope(status=boundary_pb2.BoundaryStatus(middle_step=1))
    shares = secagg_pb2.SecAggShareKeys(
        shares=[
            secagg_pb2.SecAggEncryptedShare(index=2, ciphertext=delta[i : i + 160])
            for i in range(0, 80_000, 160)
        ]
    )
    members = secagg_pb2.SecAggUnmaskRequest(survivors=list(range(1, 500)))
    hand_minted = payload(np.zeros(DIM), tensor_pb2.BOUNDARY_AGGREGATE, 5)
    honest, model = minted(DIM)
    wide, wide_model = minted(16 * DIM)
    undeclared = tensor_pb2.TensorPayload(
        provenance=7, contributors=2, dtype=tensor_pb2.FLOAT32, numel=DIM, data=bytes(4 * DIM)
    )
    huge = tensor_pb2.TensorPayload(
        provenance=tensor_pb2.BOUNDARY_AGGREGATE,
        contributors=2,
        dtype=tensor_pb2.FLOAT32,
        numel=DIM,
        data=bytes(4 * DIM),
        total_numel=1 << 40,
    )
    return [
        (
            "1 unknown fields",
            "80 KB device delta as unknown fields in BoundaryStatus",
            _received([_field(1, b"b0") + _field(2, _head()) + _field(10, status)]),
        ),
        (
            "1 unknown fields",
            "DEVICE tensor as unknown fields in CadenceUpdate (at a boundary)",
            _received([_field(1, b"b0") + _field(2, _head()) + _field(14, cadence)], "boundary.b0", "global"),
        ),
        ("1 unknown fields", "a plane's body carrying unknown fields, at egress", _sent(smuggled_status)),
        (
            "1 unknown fields",
            "a second (reordered) encoding of a valid message",
            _received(
                [_field(10, canonical.status.SerializeToString()) + _field(2, _head()) + _field(1, b"b0")]
            ),
        ),
        (
            "2 nested",
            "a delta cut into 500 ciphertexts in the outer round",
            _received([_outer(share_keys=shares)]),
        ),
        ("2 nested", "a member index list sent by a boundary", _received([_outer(unmask_request=members)])),
        (
            "2 nested",
            "a member index list of 499 sent by the global plane",
            _received([_outer(unmask_request=members)], "boundary.b0", "global"),
        ),
        (
            "2 nested",
            "a FLOAT32 'masked input'",
            _received(
                [_outer(masked_input=secagg_pb2.SecAggMaskedInput(masked=payload(np.zeros(DIM), 2, 2)))]
            ),
        ),
        (
            "2 nested",
            "a ring 'masked input' of 16x the model dimension",
            _received([_outer(masked_input=secagg_pb2.SecAggMaskedInput(masked=_ring(16 * DIM)))]),
        ),
        (
            "3 provenance",
            "BOUNDARY_AGGREGATE minted by hand (x5 contributors)",
            _sent(
                boundary_pb2.BoundaryDelta(outer_step=1, contributors=5, delta=hand_minted),
                ledger=model.ledger,
            ),
        ),
        (
            "3 provenance",
            "a boundary sends a GlobalReference",
            _sent(
                boundary_pb2.GlobalReference(
                    outer_step=1, parameters=encode(np.zeros(DIM), tensor_pb2.GLOBAL)
                )
            ),
        ),
        ("3 provenance", "one device's delta laundered through apply_aggregate", _laundered),
        (
            "3 provenance",
            "an aggregate of 16x the model dimension (honestly minted)",
            _sent(wide, ledger=wide_model.ledger),
        ),
        (
            "4 bad input",
            "an undeclared provenance value, at ingress",
            _received(
                [
                    _envelope(
                        boundary_delta=boundary_pb2.BoundaryDelta(
                            outer_step=1, contributors=2, delta=undeclared
                        )
                    ).SerializeToString()
                ]
            ),
        ),
        (
            "4 bad input",
            "an undeclared provenance value, at egress",
            _sent(boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=undeclared)),
        ),
        (
            "4 bad input",
            "slices of two message types in a row",
            _received(_sliced_two_types(), terms=Terms(QUORUM, (1 << 20) // 2)),
        ),
        (
            "4 bad input",
            "a slice claiming total_numel = 2^40",
            _received(
                [
                    _envelope(
                        boundary_delta=boundary_pb2.BoundaryDelta(outer_step=1, contributors=2, delta=huge)
                    ).SerializeToString()
                ]
            ),
        ),
        (
            "4 bad input",
            "an out-of-range fragment index",
            _received(
                [
                    _envelope(
                        sync_request=boundary_pb2.SyncRequest(outer_step=1, fragment=7, fragments=9)
                    ).SerializeToString()
                ],
                "boundary.b0",
                "global",
            ),
        ),
        (
            "4 bad input",
            "a BoundaryDelta one element longer than the model",
            _received(
                [
                    _envelope(
                        boundary_delta=boundary_pb2.BoundaryDelta(
                            outer_step=1, contributors=2, delta=payload(np.zeros(DIM + 1), 2, 2)
                        )
                    ).SerializeToString()
                ]
            ),
        ),
        ("(control)", "the honest BoundaryDelta (must cross)", _sent(honest, ledger=model.ledger)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="token budget of the demo run")
    parser.add_argument("--megabytes", type=float, default=32.0, help="size of the large aggregate")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (CI): 4 MB aggregate, 2 repetitions, a small 3,000-token demo",
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.megabytes, args.reps = 3_000, 4.0, 2
    console = Console(width=160)

    msg, mb, run = (
        per_message(args.reps),
        per_megabyte(args.megabytes, args.reps),
        in_a_run(args.tokens, args.quick),
    )
    cost = Table(title="Guard cost (egress + ingress, every check) against serialise + parse")
    for col in ("Figure", "Guards", "Baseline", "Ratio", "Target"):
        cost.add_column(col, justify="right")
    cost.add_row(
        f"per message ({msg['bytes']} B BoundaryStatus)",
        f"{msg['guard_s'] * 1e6:.1f} us",
        f"{msg['base_s'] * 1e6:.1f} us",
        f"{msg['guard_s'] / msg['base_s']:.1f}x",
        "",
    )
    cost.add_row(
        f"per MB ({mb['mb']:.0f} MB BoundaryDelta)",
        f"{mb['guard_s'] * 1e3:.2f} ms",
        f"{mb['base_s'] * 1e3:.2f} ms",
        f"{mb['guard_s'] / mb['base_s']:.1f}x",
        "",
    )
    cost.add_row(
        f"demo run ({args.tokens:,} tokens, {run['calls']} guard calls, {run['bytes']:,} B)",
        f"{run['guard']:.3f} s",
        f"{run['wall']:.1f} s wall",
        f"{run['guard'] / run['wall']:.3%}",
        "< 1%",
    )
    console.print(cost)

    table = Table(title="Every route around the guard (issue 12), sent as the attack")
    for col in ("Route", "Attack", "Refused", "Recorded"):
        table.add_column(col)
    outcomes = []
    for route, name, attack in attacks():
        refused, recorded = attack()
        control = route == "(control)"
        outcomes.append(refused != control and (recorded or control))
        table.add_row(
            route,
            name,
            "no (crossed)" if control and not refused else str(refused),
            "" if control else str(recorded),
        )
    console.print(table)
    held = sum(outcomes)
    console.print(
        f"{held} of {len(outcomes)} rows as required (every attack refused and recorded, the honest message crossing)"
    )
    print(
        f"guard_fraction={run['guard'] / run['wall']:.6f} attacks_refused_and_recorded={held}/{len(outcomes)}"
    )


if __name__ == "__main__":
    main()
