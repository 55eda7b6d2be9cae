"""SecAgg+ against a malicious server (issue 12): three attacks that recover a participant's exact
input without the defences, and fail with them; the defended protocol stays correct; inputs out
of range are refused and counted; a wrapped ring aborts the round with a record."""

from __future__ import annotations

import numpy as np
import pytest

from echelon.contract.provenance import AggregateResult
from echelon.planes.aggregation import AggregationAborted
from echelon.secagg import SecAggPlusAggregator, simulated_identities
from echelon.v1 import secagg_pb2
from tests.secagg.attacks import inconsistent_lists, key_substitution, recover, starvation
from tests.secagg.harness import SERVER, participants, run_round, seeded_entropy, weighted_sum

N, DIM, ROUND = 4, 16, 7
VICTIM = 1  # the first address in sorted order


def _aggregators(names, defended: bool, seed: int = 0, **kw):
    """The server's aggregator and, defended, each participant's (with its own certificate)."""
    kw = {"threshold": 0.5, "clip": 1.0, "entropy": seeded_entropy(seed), **kw}
    if not defended:
        return SecAggPlusAggregator(**kw), None
    parties = {f"device.{a.split('/', 1)[1]}": "boundary.b0" for a in names}
    verifier, signers = simulated_identities(parties, seed)
    server = SecAggPlusAggregator(defended=True, verifier=verifier, **kw)
    joins = {
        a: SecAggPlusAggregator(
            defended=True, verifier=verifier, signer=signers[f"device.{a.split('/', 1)[1]}"], **kw
        )
        for a in names
    }
    return server, joins


def _attack(make_hook, defended: bool, seed: int = 0):
    names, vectors, weights = participants(N, DIM, seed)
    server, joins = _aggregators(names, defended, seed)
    hook, loot = make_hook(names)
    run = run_round(server, vectors, weights, hook=hook, joins=joins, round_id=ROUND)
    params = server.parameters(N)
    stolen = recover(loot, ROUND, params.codec, params.threshold)
    victim = sorted(names)[VICTIM - 1]
    truth = weights[victim] * np.asarray(vectors[victim], dtype=np.float64)
    return run, stolen, truth, victim


def _failures(run, who: str) -> list[str]:
    return [e.fields["reason"] for p, e in run.events if p == who and e.kind == "secagg_client_failure"]


@pytest.mark.parametrize("defended", [False, True], ids=["honest-but-curious", "defended"])
def test_inconsistent_survivor_lists(defended):
    """Half the neighbours hear the victim dropped (its mask key's shares), half that it survived
    (its seed's shares): with t = n/2 the server gets both. Defended, t > n/2, and nobody reveals
    shares for a survivor set fewer than t signed, whichever split the server tries."""
    splits = [{2, 3}] if not defended else [{2}, {2, 3}, {2, 3, 4}]
    for told_dropped in splits:
        run, stolen, truth, _ = _attack(
            lambda names, d=told_dropped: inconsistent_lists(names, VICTIM, d), defended
        )
        if not defended:
            assert stolen is not None and np.abs(stolen - truth).max() <= 1e-5  # the victim's exact input
        else:
            assert stolen is None
            # The honest set gathers t signatures (the round completes, its sum exact) and the
            # forged one is refused by its readers; or neither does and the round aborts.
            refused = [
                e for _, e in run.events if "signatures on the survivor set" in e.fields.get("reason", "")
            ]
            aborted = isinstance(run.server.outcome, AggregationAborted)
            assert refused or (aborted and "signed the survivor set" in run.server.outcome.reason)


@pytest.mark.parametrize("defended", [False, True], ids=["honest-but-curious", "defended"])
def test_a_victim_starved_of_shares_refuses_to_mask(defended):
    """Forwarded no shares, a participant would mask with its self-mask alone, whose seed the
    server then asks for. It now needs valid shares from t - 1 neighbours first (both modes)."""
    run, stolen, _, victim = _attack(lambda names: starvation(names, VICTIM, keep=0), defended)
    assert stolen is None
    (reason,) = _failures(run, victim)
    assert "below t - 1" in reason
    assert not [m for o, t, m in run.sent("masked_input") if o == victim]


@pytest.mark.parametrize("defended", [False, True], ids=["honest-but-curious", "defended"])
def test_substituted_keys_in_the_roster(defended):
    """The server gives the victim its own keys for every neighbour: it decrypts the victim's
    shares and shares every pairwise mask. Defended, the substituted keys carry no signature."""
    entropy = seeded_entropy(99)
    run, stolen, truth, victim = _attack(
        lambda names: key_substitution(names, VICTIM, ROUND, entropy), defended
    )
    if not defended:
        assert stolen is not None and np.abs(stolen - truth).max() <= 1e-5
    else:
        assert stolen is None
        (reason,) = _failures(run, victim)
        assert "do not carry its signature" in reason


@pytest.mark.parametrize("seed", range(4))
def test_a_defended_round_is_exact_and_survives_dropouts(seed):
    names, vectors, weights = participants(7, 24, seed)
    server, joins = _aggregators(names, True, seed)
    drop_at = {names[seed % 7]: seed % 4}  # one participant drops at stage `seed`
    run = run_round(server, vectors, weights, drop_at, joins=joins)
    outcome = run.server.outcome
    assert isinstance(outcome, AggregateResult), outcome
    who = [p for p in names if drop_at.get(p, 99) >= 3]
    assert outcome.contributors == len(who)
    bound = run.server.parameters.codec.error_bound(len(who))
    assert np.abs(outcome.weighted_sum - weighted_sum(vectors, weights, who)).max() <= bound + 1e-9
    assert len(run.sent("consistency_request")) == len(who)


def test_defended_rounds_need_strictly_more_than_half():
    names, *_ = participants(2, 1, 0)
    server, _ = _aggregators(names, True)
    assert [server.parameters(n).threshold for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    plain, _ = _aggregators(names, False)
    assert plain.parameters(4).threshold == 2  # half: the split of test_inconsistent_survivor_lists


def test_an_advertisement_without_a_ca_certificate_is_excluded():
    names, vectors, weights = participants(5, 8, 3)
    server, joins = _aggregators(names, True, seed=3)
    outsider = names[2]
    _, foreign = simulated_identities({"device.x": "boundary.b0"}, seed=1234)  # another CA
    joins[outsider] = SecAggPlusAggregator(
        threshold=0.5, clip=1.0, defended=True, verifier=joins[outsider].verifier, signer=foreign["device.x"]
    )
    run = run_round(server, vectors, weights, joins=joins)
    assert "did not issue" in run.server.excluded[outsider]
    assert isinstance(run.server.outcome, AggregateResult) and run.server.outcome.contributors == 4


def test_a_peer_certificate_of_another_boundary_is_refused():
    verifier, signers = simulated_identities(
        {
            "device.a": "boundary.b0",
            "device.b": "boundary.b0",
            "device.c": "boundary.b1",
            "boundary.b0": None,
        },
        0,
    )
    assert verifier.peer(signers["device.b"].certificate, signers["device.a"]) is not None
    for stranger in ("device.c", "boundary.b0", "device.a"):  # another boundary's, a boundary's, its own
        with pytest.raises(ValueError, match="not a peer"):
            verifier.peer(signers[stranger].certificate, signers["device.a"])


def test_inputs_out_of_range_are_refused_counted_and_recorded_never_clipped():
    names, vectors, weights = participants(5, 16, 4)
    culprit = names[1]
    vectors[culprit] = vectors[culprit].copy()
    vectors[culprit][:3] = [np.nan, np.inf, 50.0]
    run = run_round(SecAggPlusAggregator(threshold=3, clip=1.0, entropy=seeded_entropy(4)), vectors, weights)
    (event,) = [e for p, e in run.events if p == culprit]
    assert event.kind == "secagg_input_refused"
    assert (event.fields["nan"], event.fields["inf"], event.fields["beyond_clip"]) == (1, 1, 1)
    assert run.clients[culprit].refused_values.total == 3
    others = [p for p in names if p != culprit]
    outcome = run.server.outcome
    assert isinstance(outcome, AggregateResult) and outcome.contributors == 4
    bound = run.server.parameters.codec.error_bound(4)
    assert np.abs(outcome.weighted_sum - weighted_sum(vectors, weights, others)).max() <= bound + 1e-9


def test_a_participant_that_wraps_the_ring_aborts_the_round_with_a_record():
    names, vectors, weights = participants(5, 16, 5)
    wrapper = names[3]

    def hook(origin, to, message):
        if origin == wrapper and to == SERVER and message.WhichOneof("body") == "masked_input":
            y = np.frombuffer(message.masked_input.masked.data, dtype="<u4").copy()
            y[0] += np.uint32(1 << 30)  # a huge value where the ring hides it from every check but the sum's
            message.masked_input.masked.data = y.tobytes()
        return [(origin, message)]

    run = run_round(
        SecAggPlusAggregator(threshold=3, clip=1.0, norm_bound=1.0, entropy=seeded_entropy(5)),
        {p: v / max(1.0, float(np.linalg.norm(v))) for p, v in vectors.items()},  # each input's norm <= C
        weights,
        hook=hook,
    )
    outcome = run.server.outcome
    assert isinstance(outcome, AggregationAborted) and "norm" in outcome.reason
    assert vars(run.server)["_sum"] is None


def test_a_forged_share_is_an_event_not_only_an_attribute():
    names, vectors, weights = participants(5, 8, 6)
    victim = names[0]

    def hook(origin, to, message):
        if (
            to == victim
            and isinstance(message, secagg_pb2.SecAggMessage)
            and message.HasField("forwarded_shares")
        ):
            share = message.forwarded_shares.shares[0]
            share.ciphertext = share.ciphertext[:-1] + bytes([share.ciphertext[-1] ^ 1])
        return [(origin, message)]

    run = run_round(
        SecAggPlusAggregator(threshold=3, clip=1.0, entropy=seeded_entropy(6)), vectors, weights, hook=hook
    )
    (event,) = [e for p, e in run.events if p == victim]
    assert event.kind == "secagg_share_rejected" and "authentication failed" in event.fields["reason"]
    assert event.fields["neighbour"] in run.clients[victim].rejected
