"""SecAgg+ rounds end to end through the in-test router: correctness, dropouts, misbehaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echelon.contract.provenance import AggregateResult, RoundSeal
from echelon.planes.aggregation import AggregationAborted
from echelon.sansio import Emit
from echelon.secagg import SecAggPlusAggregator, SecAggPlusClient, SecAggPlusServer, neighbour_graph
from echelon.secagg.protocol import connected, effective_degree
from echelon.v1 import device_pb2, secagg_pb2, tensor_pb2
from tests.secagg.harness import SERVER, participants, run_round, seeded_entropy, weighted_sum

# -- helpers --------------------------------------------------------------------------------------


def _aggregator(seed: int = 0, **kw) -> SecAggPlusAggregator:
    kw.setdefault("clip", 1.0)
    return SecAggPlusAggregator(entropy=seeded_entropy(seed), **kw)


def _survivors(names, drop_at, server: SecAggPlusServer):
    """Participants whose masked input reached the sum: none dropped before stage 3, none excluded."""
    return [p for p in names if drop_at.get(p, 99) >= 3 and p not in server.excluded]


def _assert_correct(run, names, vectors, weights, drop_at):
    outcome = run.server.outcome
    assert isinstance(outcome, AggregateResult), outcome
    who = _survivors(names, drop_at, run.server)
    assert outcome.contributors == len(who)
    assert outcome.weight_sum == pytest.approx(sum(weights[p] for p in who))
    expected = weighted_sum(vectors, weights, who)
    bound = run.server.parameters.codec.error_bound(len(who))
    assert np.abs(outcome.weighted_sum - expected).max() <= bound + 1e-9


def _recoverable(server: SecAggPlusServer, names, drop_at) -> bool:
    """A sufficient condition for success: every closed neighbourhood keeps t live members,
    and the stage-3 survivors form a connected graph of at least t participants."""
    p = server.parameters
    graph = neighbour_graph(7, p.participants, p.degree)
    index = server.indices
    gone = {index[a] for a in names if a in drop_at}
    survivors = {index[a] for a in names if drop_at.get(a, 99) >= 3}
    return (
        all(len((graph[i] | {i}) - gone) >= p.threshold for i in graph)
        and len(survivors) >= p.threshold
        and connected(survivors, graph)
    )


# -- property: dropouts at every stage ----------------------------------------------------------


@st.composite
def scenarios(draw):
    n = draw(st.integers(2, 9))
    degree = draw(st.one_of(st.none(), st.integers(2, max(2, n - 1))))
    m = effective_degree(n, degree) + 1
    t = draw(st.integers(1, m))
    drops = draw(st.lists(st.sampled_from([None, None, None, 0, 1, 2, 3]), min_size=n, max_size=n))
    return n, degree, t, drops, draw(st.integers(1, 24)), draw(st.integers(0, 2**32))


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_dropouts_at_every_stage_are_recovered_or_the_round_aborts(scenario):
    n, degree, t, drops, dim, seed = scenario
    names, vectors, weights = participants(n, dim, seed)
    drop_at = {p: s for p, s in zip(names, drops, strict=True) if s is not None}
    run = run_round(_aggregator(seed, threshold=t, degree=degree), vectors, weights, drop_at)
    outcome = run.server.outcome
    if effective_degree(n, degree) == n - 1:  # the complete graph recovers n - t dropouts, no more
        assert isinstance(outcome, AggregateResult) == (len(drop_at) <= n - t), outcome
    elif _recoverable(run.server, names, drop_at):
        assert isinstance(outcome, AggregateResult), outcome
    if isinstance(outcome, AggregateResult):
        _assert_correct(run, names, vectors, weights, drop_at)
        assert all(p in run.server.excluded for p, stage in drop_at.items() if stage < 3)
    else:
        assert isinstance(outcome, AggregationAborted)


def test_weights_and_a_sparse_neighbour_graph():
    names, vectors, weights = participants(20, 300, 3)
    run = run_round(_aggregator(threshold=0.6, degree=6), vectors, weights)
    assert run.server.parameters.degree == 6 and run.server.parameters.threshold == 5
    for _, _, m in run.sent("roster"):
        assert len(m.roster.neighbours) == 6
    _assert_correct(run, names, vectors, weights, {})


def test_stochastic_rounding_and_64_bit_ring():
    names, vectors, weights = participants(6, 200, 4)
    for kw in ({"stochastic_rounding": True, "scale": 2.0**8}, {"scale": 2.0**40}):
        run = run_round(_aggregator(threshold=4, **kw), vectors, weights, {names[0]: 2})
        codec = run.server.parameters.codec
        assert codec.bits == (64 if kw["scale"] > 2**30 else 32)
        outcome = run.server.outcome
        assert isinstance(outcome, AggregateResult)
        expected = weighted_sum(vectors, weights, names[1:])
        assert np.abs(outcome.weighted_sum - expected).max() <= codec.error_bound(
            5, "stochastic_rounding" in kw
        )


def test_neighbour_graph_is_regular_symmetric_public_and_per_round():
    for n, k in ((10, 4), (10, 3), (11, 3), (7, 6), (64, 12)):
        degree = effective_degree(n, k)
        graph = neighbour_graph(5, n, degree)
        assert all(len(nbrs) == degree and i not in nbrs for i, nbrs in graph.items())
        assert all(i in graph[j] for i, nbrs in graph.items() for j in nbrs)
        assert graph == neighbour_graph(5, n, degree)
    assert effective_degree(11, 3) == 4
    assert neighbour_graph(5, 30, 4) != neighbour_graph(6, 30, 4)


# -- what the server sees -----------------------------------------------------------------------


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: the 0.999 quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("bits_scale", [2.0**20, 2.0**40])
def test_masked_inputs_are_uniform_bytes(bits_scale):
    n, dim = 5, 20_000
    names = [f"device/d{i}" for i in range(n)]
    vectors = {p: np.zeros(dim, dtype=np.float32) for p in names}  # worst case: all-zero inputs
    vectors[names[0]] = np.full(dim, 0.25, dtype=np.float32)
    weights = dict.fromkeys(names, 1.0)
    run = run_round(_aggregator(11, threshold=3, degree=2, scale=bits_scale), vectors, weights)
    critical = _chi_square_critical(255)
    masked = run.sent("masked_input")
    assert len(masked) == n
    for _, _, m in masked:
        counts = np.bincount(np.frombuffer(m.masked_input.masked.data, dtype=np.uint8), minlength=256)
        expected = counts.sum() / 256
        assert ((counts - expected) ** 2 / expected).sum() < critical
    # The same test rejects an unmasked encoding: the check has power.
    plain = run.server.parameters.codec.encode(vectors[names[0]])
    counts = np.bincount(np.frombuffer(plain.tobytes(), dtype=np.uint8), minlength=256)
    assert ((counts - counts.sum() / 256) ** 2 / (counts.sum() / 256)).sum() > critical


def _walk(value, seen=None):
    """Every array and bytes object reachable from `value` (dicts, sequences, object attributes)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, np.ndarray | bytes | bytearray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _walk(v, seen)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _walk(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _walk(vars(value), seen)


def test_server_state_never_holds_an_unmasked_input_and_is_erased():
    names, vectors, weights = participants(5, 64, 8)
    agg = _aggregator(threshold=3)
    codec = agg.parameters(5).codec
    forbidden = set()  # every form of an individual input: raw, weighted, encoded
    for p in names:
        weighted = np.asarray(vectors[p], dtype=np.float64) * weights[p]
        forbidden |= {np.asarray(vectors[p]).tobytes(), weighted.tobytes(), codec.encode(weighted).tobytes()}
    servers, inspections = [], []
    make_server = agg.server
    agg.server = lambda *args: servers.append(make_server(*args)) or servers[-1]

    def inspect(server) -> None:
        for obj in _walk(server):
            assert (obj.tobytes() if isinstance(obj, np.ndarray) else bytes(obj)) not in forbidden
        inspections.append(server.outcome)

    def hook(origin, to, message):
        if to == SERVER:
            inspect(servers[0])  # before every delivery: after each masked input was added
        return [(origin, message)]

    run = run_round(agg, vectors, weights, {names[4]: 2}, hook=hook)
    inspect(run.server)
    assert len(inspections) > 3 * 5
    _assert_correct(run, names, vectors, weights, {names[4]: 2})
    state = vars(run.server)
    assert state["_sum"] is None and not state["_seed_shares"] and not state["_key_shares"]
    for name in names[:4]:  # names[4] dropped out, as a crashed device would
        c = vars(run.clients[name])
        assert c["_done"] and c["_vector"] is None and c["_cipher_key"] is None and c["_mask_key"] is None
        assert not any(c["_seed"]) and not c["_seed_shares"] and not c["_key_shares"]


# -- below threshold ------------------------------------------------------------------------------


def test_below_threshold_before_unmasking_aborts_without_asking_for_shares():
    names, vectors, weights = participants(5, 16, 1)
    drop_at = dict.fromkeys(names[:3], 2)  # 2 masked inputs, t = 3
    run = run_round(_aggregator(threshold=3), vectors, weights, drop_at)
    assert isinstance(run.server.outcome, AggregationAborted)
    assert "below the quorum of 3" in run.server.outcome.reason
    assert not run.sent("unmask_request")
    assert vars(run.server)["_sum"] is None


def test_too_few_unmask_responses_abort_having_seen_fewer_than_t_shares():
    names, vectors, weights = participants(5, 16, 1)
    drop_at = dict.fromkeys(names[:3], 3)  # all 5 masked, only 2 answer the unmask request
    run = run_round(_aggregator(threshold=3), vectors, weights, drop_at)
    assert isinstance(run.server.outcome, AggregationAborted)
    assert "fewer than 3 shares" in run.server.outcome.reason
    revealed = run.sent("unmask_response")
    assert len(revealed) == 2  # 2 < t shares of every seed: nothing can be reconstructed
    assert vars(run.server)["_sum"] is None


def test_min_quorum_is_enforced():
    names, vectors, weights = participants(5, 16, 1)
    run = run_round(_aggregator(threshold=2, min_quorum=5), vectors, weights, {names[0]: 1})
    assert "below the quorum of 5" in run.server.outcome.reason


def test_disconnected_survivors_abort_before_unmasking():
    n = 6
    names, vectors, weights = participants(n, 8, 2)
    graph = neighbour_graph(7, n, 2)  # a ring
    a = 1
    b = next(j for j in graph if j != a and j not in graph[a] and not graph[a] & graph[j])  # opposite
    index_to_name = dict(enumerate(sorted(names), start=1))
    drop_at = {index_to_name[a]: 2, index_to_name[b]: 2}
    run = run_round(_aggregator(threshold=2, degree=2), vectors, weights, drop_at)
    assert "disconnected" in run.server.outcome.reason
    assert not run.sent("unmask_request")


# -- misbehaviour ---------------------------------------------------------------------------------


def _message(round_id=7, **body):
    return secagg_pb2.SecAggMessage(round_id=round_id, **body)


def test_tampered_and_misrouted_shares_are_caught_by_the_aead():
    names, vectors, weights = participants(5, 32, 5)
    victim = names[1]

    def hook(origin, to, message):
        if (
            to == victim
            and isinstance(message, secagg_pb2.SecAggMessage)
            and message.HasField("forwarded_shares")
        ):
            shares = message.forwarded_shares.shares
            flipped = bytearray(shares[0].ciphertext)
            flipped[20] ^= 0x40
            shares[0].ciphertext = bytes(flipped)
            shares[1].ciphertext, shares[2].ciphertext = shares[2].ciphertext, shares[1].ciphertext
        return [(origin, message)]

    run = run_round(_aggregator(threshold=3), vectors, weights, hook=hook)
    rejected = run.clients[victim].rejected
    assert len(rejected) == 3 and all("authentication failed" in r for r in rejected.values())
    _assert_correct(run, names, vectors, weights, {})  # the other holders' shares suffice


def _inject(at_kind: str, sender: str, make):
    """A hook that, when the first `at_kind` message reaches the server, first delivers `make()`."""
    done = []

    def hook(origin, to, message):
        out = [(origin, message)]
        if not done and to == SERVER and message.WhichOneof("body") == at_kind:
            done.append(True)
            out = [(sender, make()), *out]
        return out

    return hook


@pytest.mark.parametrize(
    ("at_kind", "make", "reason"),
    [
        (
            "advertise_keys",
            lambda: _message(advertise_keys=secagg_pb2.SecAggAdvertiseKeys()),
            "invalid X25519",
        ),
        (
            "advertise_keys",
            lambda: _message(
                advertise_keys=secagg_pb2.SecAggAdvertiseKeys(
                    cipher_public_key=bytes(32), mask_public_key=bytes(32), seed_commitment=bytes(32)
                )
            ),
            "invalid X25519",
        ),
        (
            "advertise_keys",
            lambda: _message(round_id=6, advertise_keys=secagg_pb2.SecAggAdvertiseKeys()),
            "round 6",
        ),
        ("advertise_keys", lambda: device_pb2.PlainInput(round_id=7), "unexpected PlainInput"),
        ("advertise_keys", lambda: _message(), "empty message during the advertise stage"),
        ("share_keys", lambda: _message(share_keys=secagg_pb2.SecAggShareKeys()), "shares for 0 of"),
        (
            "masked_input",
            lambda: _message(
                masked_input=secagg_pb2.SecAggMaskedInput(
                    masked=tensor_pb2.TensorPayload(
                        provenance=tensor_pb2.DEVICE, dtype=tensor_pb2.UINT32, numel=16
                    )
                )
            ),
            "wrong provenance, dtype or size",
        ),
        (
            "masked_input",
            lambda: _message(unmask_response=secagg_pb2.SecAggUnmaskResponse()),
            "during the masked",
        ),
    ],
)
def test_malformed_messages_exclude_their_sender(at_kind, make, reason):
    names, vectors, weights = participants(5, 16, 6)
    culprit = names[2]
    run = run_round(_aggregator(threshold=3), vectors, weights, hook=_inject(at_kind, culprit, make))
    assert reason in run.server.excluded[culprit]
    _assert_correct(run, names, vectors, weights, {})


@pytest.mark.parametrize("kind", ["advertise_keys", "share_keys", "masked_input", "unmask_response"])
def test_duplicated_messages_exclude_or_mute_their_sender(kind):
    names, vectors, weights = participants(5, 16, 7)
    culprit = names[0]  # the first to answer each stage, so its duplicate arrives mid-stage

    def hook(origin, to, message):
        if origin == culprit and to == SERVER and message.WhichOneof("body") == kind:
            return [(origin, message), (origin, message)]
        return [(origin, message)]

    run = run_round(_aggregator(threshold=3), vectors, weights, hook=hook)
    if kind in ("masked_input", "unmask_response"):  # already in the sum: muted, still counted
        assert culprit not in run.server.excluded
        assert any(a == culprit and f"duplicate {kind}" in r for a, r in run.server.log)
    else:
        assert run.server.excluded[culprit] == f"duplicate {kind}"
    _assert_correct(run, names, vectors, weights, {})


def test_replayed_stage_message_and_late_input_and_strangers():
    names, vectors, weights = participants(5, 16, 9)
    held = {}

    def hook(origin, to, message):
        out = [(origin, message)]
        if to == SERVER and isinstance(message, secagg_pb2.SecAggMessage):
            kind = message.WhichOneof("body")
            if origin == names[0] and kind == "advertise_keys":
                held["keys"] = message
            if origin == names[1] and kind == "masked_input":
                held["late"] = message
                return []  # held back past the deadline
            if kind == "unmask_response" and "late" in held:
                out = [
                    (names[1], held.pop("late")),  # after the masked deadline: ignored
                    (names[0], held.pop("keys")),  # a stage-1 message replayed in stage 4: muted
                    ("device/stranger", message),  # not invited
                    *out,
                ]
        return out

    run = run_round(_aggregator(threshold=3), vectors, weights, hook=hook)
    excluded = run.server.excluded
    assert excluded[names[1]] == "no masked input before the masked deadline"
    assert excluded["device/stranger"] == "not invited to this round"
    assert any(a == names[0] and "advertise_keys during the unmask stage" in r for a, r in run.server.log)
    _assert_correct(run, names, vectors, weights, {names[1]: 2})


def test_messages_after_the_outcome_are_ignored():
    names, vectors, weights = participants(3, 4, 1)
    run = run_round(_aggregator(threshold=2), vectors, weights)
    outcome = run.server.outcome
    assert run.server.receive(run.now, names[0], _message()) == []
    assert run.server.on_timer(run.now, "agg/7/unmask") == []
    assert run.server.outcome is outcome and names[0] not in run.server.excluded


# -- a curious or faulty server, seen from a participant -----------------------------------------


def test_participant_refuses_to_reveal_both_secrets_of_anyone():
    names, vectors, weights = participants(5, 16, 10)
    victim = names[0]

    def hook(origin, to, message):
        if (
            to == victim
            and isinstance(message, secagg_pb2.SecAggMessage)
            and message.HasField("unmask_request")
        ):
            message.unmask_request.dropped.append(message.unmask_request.survivors[-1])
        return [(origin, message)]

    run = run_round(_aggregator(threshold=3), vectors, weights, hook=hook)
    client = run.clients[victim]
    assert "both as dropped and as a survivor" in client.failure and client.done
    assert all(o != victim for o, _, _ in run.sent("unmask_response"))
    _assert_correct(run, names, vectors, weights, {})  # its seed is recovered from the others


def test_participant_refuses_a_roster_with_a_lowered_threshold():
    names, vectors, weights = participants(4, 8, 12)

    def hook(origin, to, message):
        if isinstance(message, secagg_pb2.SecAggMessage) and message.HasField("roster") and to == names[2]:
            message.roster.threshold = 1
        return [(origin, message)]

    run = run_round(_aggregator(threshold=3), vectors, weights, hook=hook)
    assert "differ" in run.clients[names[2]].failure
    assert run.server.excluded[names[2]] == "no shares before the share deadline"
    _assert_correct(run, names, vectors, weights, {})


def test_participant_ignores_stray_messages_and_unusable_requests():
    agg = _aggregator(threshold=2)
    request = device_pb2.AggregationRequest(round_id=7, weight=1.0, participants=3)
    client = agg.join(SERVER, request, np.zeros(4), tensor_pb2.DEVICE)
    assert isinstance(client, SecAggPlusClient)
    assert len(client.start(0.0)) == 1
    assert client.receive(0.0, _message(round_id=8, roster=secagg_pb2.SecAggRoster())) == []
    assert client.receive(0.0, _message(unmask_request=secagg_pb2.SecAggUnmaskRequest())) == []
    assert len(client.log) == 2 and not client.done
    # A malformed roster ends its participation, and the failure is an event, not only an attribute.
    roster = secagg_pb2.SecAggRoster(threshold=2, degree=2, bits=32, index=9)
    (event,) = client.receive(0.0, _message(roster=roster))
    assert client.done and "outside" in client.failure
    assert event == Emit("secagg_client_failure", {"round_id": 7, "reason": client.failure})
    broken = agg.join(SERVER, device_pb2.AggregationRequest(round_id=7, participants=0), np.zeros(4), 1)
    (event,) = broken.start(0.0)
    assert broken.done and event.kind == "secagg_client_failure" and "unusable" in event.fields["reason"]


def test_aggregator_rejects_unusable_parameters():
    for kw in ({"threshold": 0}, {"threshold": 1.5}, {"degree": 1}, {"min_quorum": 0}):
        with pytest.raises(ValueError):
            SecAggPlusAggregator(**kw)
    with pytest.raises(ValueError):
        SecAggPlusAggregator(threshold=5, degree=2).parameters(10)
    server = SecAggPlusAggregator(threshold=5).server(
        7, {"device/a": 1.0, "device/b": 1.0}, 4, 1, RoundSeal.open(7, 2)
    )
    assert server.start(0.0) == [] and "exceeds the 2 shares" in server.outcome.reason


# -- 1,000 randomized dropout trials (pytest -m slow) --------------------------------------------


@pytest.mark.slow
def test_one_thousand_randomized_dropout_trials():
    rng = np.random.default_rng(2024)
    failures, outcomes = [], {"recovered": 0, "aborted": 0}
    for trial in range(1000):
        n = int(rng.integers(3, 17))
        degree = None if rng.random() < 0.4 else int(rng.integers(2, n))
        m = effective_degree(n, degree) + 1
        t = int(rng.integers(max(1, m // 2), m + 1))
        names, vectors, weights = participants(n, int(rng.integers(1, 65)), trial)
        p_drop = rng.uniform(0.0, 0.4)
        drop_at = {p: int(rng.integers(0, 4)) for p in names if rng.random() < p_drop}
        run = run_round(_aggregator(trial, threshold=t, degree=degree), vectors, weights, drop_at)
        outcome = run.server.outcome
        try:
            if degree is None or effective_degree(n, degree) == n - 1:
                assert isinstance(outcome, AggregateResult) == (len(drop_at) <= n - t), outcome
            elif _recoverable(run.server, names, drop_at):
                assert isinstance(outcome, AggregateResult), outcome
            if isinstance(outcome, AggregateResult):
                _assert_correct(run, names, vectors, weights, drop_at)
            else:
                assert isinstance(outcome, AggregationAborted)
        except AssertionError as e:
            failures.append((trial, n, degree, t, drop_at, str(e)))
        outcomes["recovered" if isinstance(outcome, AggregateResult) else "aborted"] += 1
    assert not failures, failures[:3]
    assert outcomes["recovered"] > 500
