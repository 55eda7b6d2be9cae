"""SecAgg+ as sans-IO server and client state machines (the `Aggregator` interface).

Bonawitz et al. 2017 ("Practical Secure Aggregation"), with the public k-regular neighbour graph
of Bell et al. 2020 (SecAgg+); degree None, or k >= n - 1, gives the complete graph of SecAgg.
Participants are indexed 1..n by their sorted addresses. Each round runs four stages (five when
defended against a malicious server), each closed when every awaited participant answered or at
its deadline (missing ones drop out):

1. advertise keys: each participant sends two X25519 public keys (c_pk for share transport,
   s_pk for pairwise masks) and a commitment to its fresh 256-bit self-mask seed b_i.
2. share keys: the server sends each participant its roster (index, t, k, ring bits, and the keys
   of its neighbours that advertised); the participant Shamir-shares b_i and s_sk_i t-of-m among
   its neighbours and itself, encrypting each neighbour's pair with ChaCha20-Poly1305 under a key
   agreed from c_sk_i and c_pk_j. The server routes the ciphertexts.
3. masked input: a participant that received valid shares from at least t - 1 neighbours encodes
   w_i * x_i (fixed point in Z_(2^bits), w_i from the AggregationRequest; a NaN, infinite or
   out-of-range value makes it refuse, never clip) and adds PRG(b_i) and +-PRG(s_ij) for each
   neighbour j that completed stage 2 (+ when i < j). The server adds the masked vectors into one
   running sum mod 2^bits.
4. (defended rounds) consistency: the server sends the stage-3 survivors U3 to each of them; each
   signs U3 with its certificate's key.
5. unmask: the surviving participants reveal their shares of the survivors' seeds b_i and of
   the dropped participants' s_sk_j, never both for one participant. The server reconstructs
   them, removes the masks chunk by chunk (regenerating each PRG stream, memory O(d)) and decodes
   the sum. Reconstructed seeds are checked against their commitments, keys against s_pk, and
   the decoded sum's L2 norm against sum_i max(1, w_i) * C (each input's norm is at most C): a
   sum beyond it (an input that wrapped the ring) aborts the round.

Defences against a malicious server (`defended`, Bonawitz et al.'s malicious variant): every
participant signs its advertisement with its certificate's key and checks its neighbours'
certificates (issued by the deployment CA, of its own kind) and signatures, so the server can
neither substitute keys nor invent participants; the threshold is raised to strictly more than
half a neighbourhood, so two survivor sets cannot both gather t signatures from honest
participants; and a participant reveals shares only for a survivor set that at least t distinct
certified participants signed. Without them the protocol holds against an honest-but-curious
server only. Every participant, defended or not, needs valid shares from t - 1 neighbours before
masking (with fewer, the server could unmask it alone).

The server learns sum_i w_i x_i over the survivors of stage 3, their count and their public
weight sum. Dropouts at any stage are recovered while every needed secret keeps t shares among
the remaining neighbours (with the complete graph: up to n - t dropouts in all). Otherwise the
round aborts: below quorum (max(min_quorum, t)) or with a disconnected survivor graph (which
would reveal partial sums) before any unmasking; or with too few shares after it, when what the
server holds (some survivors' seeds, some dropped participants' keys) still leaves each
survivor's input under the pairwise mask it shares with a surviving neighbour. A malformed,
duplicated, out-of-stage, late or replayed message excludes its sender (`excluded`, with the
reason); a sender whose masked input is already in the sum cannot be taken out of it, so it is
muted instead (`log`) and its secrets are recovered from its neighbours. A participant's own
refusals (a failed check, a forged share) are `Emit` events. Secrets and shares are erased
(references dropped, buffers overwritten) once unmasked or aborted.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from google.protobuf.message import Message

from echelon.contract.provenance import RoundSeal
from echelon.planes.aggregation import (
    AggregationAborted,
    AggregationClient,
    AggregationServer,
    Aggregator,
    Outcome,
)
from echelon.sansio import Action, CancelTimer, Emit, PlaneAction, Send, SetTimer
from echelon.secagg import primitives as crypto
from echelon.secagg import shamir
from echelon.secagg.fixedpoint import FixedPoint, OutOfRange
from echelon.secagg.identity import PublicKey, Signer, Verifier, fingerprint, verify_signature
from echelon.v1 import device_pb2, secagg_pb2, tensor_pb2

Entropy = Callable[[int], bytes]
"""entropy(n) -> n uniformly random bytes: os.urandom, or a seeded source for reproducible tests."""

RING_DTYPE = {32: tensor_pb2.UINT32, 64: tensor_pb2.UINT64}
SEALED_PAIR_BYTES = crypto.NONCE_BYTES + 2 * shamir.SHARE_BYTES + crypto.TAG_BYTES


def keys_message(
    round_id: int, keys: secagg_pb2.SecAggAdvertiseKeys | secagg_pb2.SecAggNeighbourKeys
) -> bytes:
    """The bytes a participant signs when it advertises its keys for round `round_id`."""
    return b"".join(
        (
            crypto.DOMAIN,
            b"/advertise",
            round_id.to_bytes(8, "little"),
            keys.cipher_public_key,
            keys.mask_public_key,
            keys.seed_commitment,
        )
    )


def survivors_message(round_id: int, survivors: Iterable[int]) -> bytes:
    """The bytes a participant signs to attest the survivor set of round `round_id`."""
    members = sorted(survivors)
    body = b"".join(i.to_bytes(4, "little") for i in members)
    return (
        crypto.DOMAIN
        + b"/survivors"
        + round_id.to_bytes(8, "little")
        + len(members).to_bytes(4, "little")
        + body
    )


@dataclass(frozen=True)
class StageTimeouts:
    """Seconds the server waits for each stage's messages; the missing participants drop out."""

    advertise: float = 30.0
    share: float = 30.0
    masked: float = 120.0
    consistency: float = 30.0
    unmask: float = 30.0


@dataclass(frozen=True)
class RoundParameters:
    """The concrete parameters of a round of `participants` (server and clients compute the same)."""

    participants: int
    degree: int  # of the neighbour graph; participants - 1 for the complete graph
    threshold: int  # Shamir t, out of degree + 1 shares (the neighbours' and one's own)
    codec: FixedPoint


def effective_degree(n: int, degree: int | None) -> int:
    """The neighbour degree used for n participants: n - 1 (complete graph) when `degree` is None
    or at least n - 1; an odd degree with odd n is raised by one (no odd-regular graph exists)."""
    if degree is None or degree >= n - 1:
        return max(n - 1, 0)
    if degree < 2:
        raise ValueError(f"neighbour degree must be at least 2, not {degree}")
    return degree + 1 if degree % 2 and n % 2 else degree


def neighbour_graph(round_id: int, n: int, degree: int) -> dict[int, frozenset[int]]:
    """The public neighbour graph of round `round_id` over indices 1..n (index -> neighbours).

    `degree` as returned by `effective_degree`. For degree < n - 1: a circulant graph (each
    participant joined to the degree // 2 nearest on either side of a ring, plus the opposite one
    for odd degree) over a ring order shuffled by a generator seeded with SHA-256 of the round id
    and n; public and reproducible by anyone, different every round.
    """
    nodes = range(1, n + 1)
    if degree >= n - 1:
        return {i: frozenset(j for j in nodes if j != i) for i in nodes}
    if degree % 2 and n % 2:
        raise ValueError(f"no {degree}-regular graph on {n} nodes")
    seed = hashlib.sha256(
        crypto.DOMAIN + b"/graph" + round_id.to_bytes(8, "little") + n.to_bytes(4, "little")
    )
    ring = list(nodes)
    random.Random(int.from_bytes(seed.digest(), "little")).shuffle(ring)
    offsets = [*range(1, degree // 2 + 1), *([n // 2] if degree % 2 else [])]
    return {
        i: frozenset(ring[(p + o) % n] for o in offsets) | frozenset(ring[(p - o) % n] for o in offsets)
        for p, i in enumerate(ring)
    }


def connected(nodes: Iterable[int], graph: Mapping[int, frozenset[int]]) -> bool:
    """Whether the subgraph of `graph` induced on `nodes` is connected (True when empty)."""
    remaining = set(nodes)
    if not remaining:
        return True
    frontier = [remaining.pop()]
    while frontier:
        reached = graph[frontier.pop()] & remaining
        remaining -= reached
        frontier.extend(reached)
    return not remaining


class SecAggPlusAggregator(Aggregator):
    """SecAgg+ rounds: the server learns only the weighted sum of the survivors' vectors.

    threshold: Shamir t, an int, or a fraction of the neighbourhood size m = degree + 1
        (t = ceil(fraction * m)); dropouts are recovered while t shares remain.
    degree: neighbour degree k (None: complete graph, classic SecAgg).
    min_quorum: fewest contributors for a result (the round needs max(min_quorum, t)).
    timeouts: per-stage deadlines (seconds).
    clip, scale, bits: the fixed-point encoding of each weighted coordinate (see fixedpoint);
        bits None picks 32 or 64 from the headroom n * ceil(clip * scale).
    stochastic_rounding: unbiased stochastic rounding instead of round-to-nearest.
    norm_bound: the L2 norm each participant's unweighted vector keeps (None: clip * sqrt(d),
        all a coordinate range implies); the server aborts a round whose decoded sum exceeds
        sum_i max(1, w_i) * norm_bound (plus the fixed-point error).
    defended: defences against a malicious server (see the module docstring); they need the
        deployment CA (`verifier`) on every side, and a participant's `signer`.
    chunk: elements per PRG chunk (memory of mask generation beyond the vector itself).
    entropy: source of secret randomness (os.urandom; a seeded source only for tests).
    """

    name = "secagg+"

    def __init__(
        self,
        *,
        threshold: float | int = 0.5,
        degree: int | None = None,
        min_quorum: int = 1,
        timeouts: StageTimeouts | None = None,
        clip: float = 1.0,
        scale: float = 2.0**20,
        bits: int | None = None,
        stochastic_rounding: bool = False,
        norm_bound: float | None = None,
        defended: bool = False,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
        chunk: int = 1 << 16,
        entropy: Entropy = os.urandom,
    ) -> None:
        if isinstance(threshold, int) and threshold < 1:
            raise ValueError(f"threshold must be at least 1, not {threshold}")
        if isinstance(threshold, float) and not 0.0 < threshold <= 1.0:
            raise ValueError(f"a threshold fraction must lie in (0, 1], not {threshold}")
        if degree is not None and degree < 2:
            raise ValueError(f"neighbour degree must be at least 2, not {degree}")
        if min_quorum < 1 or chunk < 1:
            raise ValueError("min_quorum and chunk must be positive")
        if defended and verifier is None:
            raise ValueError("a round defended against a malicious server needs the deployment CA (verifier)")
        self.threshold = threshold
        self.degree = degree
        self.min_quorum = min_quorum
        self.timeouts = timeouts or StageTimeouts()
        self.clip, self.scale, self.bits = clip, scale, bits
        self.stochastic_rounding = stochastic_rounding
        self.norm_bound = norm_bound
        self.defended, self.signer, self.verifier = defended, signer, verifier
        self.chunk = chunk
        self.entropy = entropy

    def parameters(self, participants: int) -> RoundParameters:
        """The round's parameters for n = `participants`; ValueError when they are unusable."""
        if participants < 1:
            raise ValueError(f"a round needs participants, not {participants}")
        degree = effective_degree(participants, self.degree)
        m = degree + 1
        t = (
            self.threshold
            if isinstance(self.threshold, int)
            else max(1, math.ceil(self.threshold * m - 1e-9))
        )
        if self.defended:
            t = max(t, m // 2 + 1)  # strictly more than half: one survivor set can gather t signatures
        if t > m:
            raise ValueError(f"threshold {t} exceeds the {m} shares of a neighbourhood")
        return RoundParameters(
            participants, degree, t, FixedPoint.for_sum(self.clip, self.scale, participants, self.bits)
        )

    def server(
        self, round_id: int, weights: Mapping[str, float], dim: int, provenance: int, seal: RoundSeal
    ) -> SecAggPlusServer:
        return SecAggPlusServer(round_id, weights, dim, provenance, self, seal)

    def join(
        self,
        server: str,
        request: device_pb2.AggregationRequest,
        vector: np.ndarray,
        provenance: int,
        contributors: int = 0,
    ) -> SecAggPlusClient:
        return SecAggPlusClient(server, request, vector, provenance, self, contributors)


class Stage(IntEnum):
    """The server's stages, in order (CONSISTENCY only in defended rounds)."""

    ADVERTISE = 1
    SHARE = 2
    MASKED = 3
    CONSISTENCY = 4
    UNMASK = 5


_AWAITED = {
    Stage.ADVERTISE: "advertise_keys",
    Stage.SHARE: "share_keys",
    Stage.MASKED: "masked_input",
    Stage.CONSISTENCY: "consistency_response",
    Stage.UNMASK: "unmask_response",
}
_WHAT = {
    Stage.ADVERTISE: "keys",
    Stage.SHARE: "shares",
    Stage.MASKED: "masked input",
    Stage.CONSISTENCY: "signature",
    Stage.UNMASK: "response",
}


def _first(shares: Mapping[int, int], t: int) -> dict[int, int]:
    return dict(sorted(shares.items())[:t])


class SecAggPlusServer(AggregationServer):
    """Server side of one SecAgg+ round (see the module docstring). Never crashes on input."""

    def __init__(
        self,
        round_id: int,
        weights: Mapping[str, float],
        dim: int,
        provenance: int,
        config: SecAggPlusAggregator,
        seal: RoundSeal,
    ) -> None:
        self.round_id, self._seal = round_id, seal
        self._weights = dict(weights)
        self._address = dict(enumerate(sorted(self._weights), start=1))
        self._index = {a: i for i, a in self._address.items()}
        self._dim, self._provenance = dim, provenance
        self._outcome: Outcome | None = None
        try:
            self._params = config.parameters(len(self._weights))
        except ValueError as e:  # e.g. fewer participants than an absolute threshold needs
            self._params = RoundParameters(0, 0, 1, FixedPoint(1.0, 1.0, 32))
            self._outcome = AggregationAborted(f"unusable round: {e}")
        self._graph = neighbour_graph(round_id, self._params.participants, self._params.degree)
        self._required = max(config.min_quorum, self._params.threshold)
        self._timeouts, self._chunk = config.timeouts, config.chunk
        self._norm_bound = config.clip * math.sqrt(dim) if config.norm_bound is None else config.norm_bound
        self._defended, self._verifier = config.defended, config.verifier
        self._probe = crypto.private_key(config.entropy(crypto.KEY_BYTES))  # validates public keys
        self._stage = Stage.ADVERTISE
        self._active: set[int] = set(self._address)  # awaited in this stage
        self._responded: set[int] = set()
        self._keys: dict[int, secagg_pb2.SecAggAdvertiseKeys] = {}
        self._signers: dict[int, PublicKey] = {}  # defended: each advertiser's certified key
        self._signatures: dict[int, bytes] = {}  # defended: signatures over the survivor set
        self._advertised: frozenset[int] = frozenset()  # U1
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> sealed pair
        self._shared: frozenset[int] = frozenset()  # U2
        self._sum: np.ndarray | None = None  # running sum of masked inputs, mod 2^bits
        self._contributors: set[int] = set()  # U3: masked inputs in the sum
        self._dropped: tuple[int, ...] = ()  # U2 \ U3 whose pairwise masks are in the sum
        self._seed_shares: dict[int, dict[int, int]] = {}  # survivor -> holder -> share
        self._key_shares: dict[int, dict[int, int]] = {}  # dropped -> holder -> share
        self._muted: set[int] = set()
        self._excluded: dict[str, str] = {}
        self.log: list[tuple[str, str]] = []

    @property
    def indices(self) -> Mapping[str, int]:
        """Participant address -> index in this round (sorted addresses, from 1)."""
        return self._index

    @property
    def parameters(self) -> RoundParameters:
        return self._params

    @property
    def outcome(self) -> Outcome | None:
        return self._outcome

    @property
    def excluded(self) -> Mapping[str, str]:
        return self._excluded

    def _timer(self, stage: Stage) -> str:
        return f"agg/{self.round_id}/{stage.name.lower()}"

    def _message(self, **body: Message) -> secagg_pb2.SecAggMessage:
        return secagg_pb2.SecAggMessage(round_id=self.round_id, **body)

    # -- events ---------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        if self._outcome is not None:
            return []
        n = self._params.participants
        actions: list[Action] = [
            Send(
                a,
                device_pb2.AggregationRequest(
                    round_id=self.round_id, weight=self._weights[a], participants=n
                ),
            )
            for a in self._address.values()
        ]
        actions.append(SetTimer(self._timer(Stage.ADVERTISE), now + self._timeouts.advertise))
        return actions

    def receive(self, now: float, sender: str, message: Message) -> list[Action]:
        if self._outcome is not None:
            return []
        i = self._index.get(sender)
        if i is None:
            self._excluded.setdefault(sender, "not invited to this round")
            return []
        if sender in self._excluded or i in self._muted:
            self.log.append((sender, "message ignored: the sender is excluded"))
            return []
        try:
            body = self._check(i, message)
            handle = {
                Stage.ADVERTISE: self._on_keys,
                Stage.SHARE: self._on_shares,
                Stage.MASKED: self._on_masked,
                Stage.CONSISTENCY: self._on_consistency,
                Stage.UNMASK: self._on_unmask,
            }[self._stage]
            handle(i, body)
            self._responded.add(i)
        except ValueError as e:
            self._drop(i, str(e))
        return self._maybe_close(now)

    def on_timer(self, now: float, key: str) -> list[Action]:
        if self._outcome is not None or key != self._timer(self._stage):
            return []
        for i in sorted(self._active - self._responded - self._muted):
            self._drop(i, f"no {_WHAT[self._stage]} before the {self._stage.name.lower()} deadline")
        if self._stage is Stage.UNMASK:
            return self._finish() if self._recoverable() else self._abort(self._shortfall())
        return self._close(now)

    # -- validation -----------------------------------------------------------------------------

    def _check(self, i: int, message: Message) -> Message:
        """The body of a well-formed message awaited from participant i now; else ValueError."""
        if not isinstance(message, secagg_pb2.SecAggMessage):
            raise ValueError(f"unexpected {type(message).__name__}")
        if message.round_id != self.round_id:
            raise ValueError(
                f"message of round {message.round_id} in round {self.round_id} (replayed or stray)"
            )
        kind = message.WhichOneof("body")
        if kind != _AWAITED[self._stage]:
            raise ValueError(f"{kind or 'empty message'} during the {self._stage.name.lower()} stage")
        if i in self._responded:
            raise ValueError(f"duplicate {kind}")
        return getattr(message, kind)

    def _on_keys(self, i: int, body: secagg_pb2.SecAggAdvertiseKeys) -> None:
        for key in (body.cipher_public_key, body.mask_public_key):
            try:
                crypto.agree(self._probe, key)
            except ValueError:
                raise ValueError("invalid X25519 public key") from None
        if len(body.seed_commitment) != 32:
            raise ValueError("seed commitment is not 32 bytes")
        if self._defended:
            signer = self._verifier.key(body.certificate)
            verify_signature(signer, body.signature, keys_message(self.round_id, body))
            mine = fingerprint(body.certificate)
            if any(fingerprint(k.certificate) == mine for k in self._keys.values()):
                raise ValueError("a certificate another participant of this round already presented")
            self._signers[i] = signer
        self._keys[i] = body

    def _on_consistency(self, i: int, body: secagg_pb2.SecAggConsistencyResponse) -> None:
        verify_signature(
            self._signers[i], body.signature, survivors_message(self.round_id, self._contributors)
        )
        self._signatures[i] = body.signature

    def _on_shares(self, i: int, body: secagg_pb2.SecAggShareKeys) -> None:
        expected = self._graph[i] & self._advertised
        sealed: dict[int, bytes] = {}
        for share in body.shares:
            if share.index not in expected or share.index in sealed:
                raise ValueError(f"share for #{share.index}: not an advertised neighbour, or repeated")
            if len(share.ciphertext) != SEALED_PAIR_BYTES:
                raise ValueError(f"sealed share of {len(share.ciphertext)} B, not {SEALED_PAIR_BYTES}")
            sealed[share.index] = share.ciphertext
        if len(sealed) != len(expected):
            raise ValueError(f"shares for {len(sealed)} of its {len(expected)} neighbours")
        self._ciphertexts[i] = sealed

    def _on_masked(self, i: int, body: secagg_pb2.SecAggMaskedInput) -> None:
        t, codec = body.masked, self._params.codec
        data = t.data  # one copy out of the message, dropped once added
        if (
            t.provenance != self._provenance
            or t.dtype != RING_DTYPE[codec.bits]
            or t.numel != self._dim
            or len(data) != self._dim * codec.dtype.itemsize
            or t.offset
            or t.total_numel
        ):
            raise ValueError("masked input has the wrong provenance, dtype or size")
        assert self._sum is not None
        np.add(self._sum, np.frombuffer(data, dtype=codec.dtype), out=self._sum)
        self._contributors.add(i)

    def _on_unmask(self, i: int, body: secagg_pb2.SecAggUnmaskResponse) -> None:
        seeds = self._read_shares(body.seed_shares, (self._graph[i] | {i}) & self._contributors, "seed")
        keys = self._read_shares(body.key_shares, self._graph[i] & set(self._dropped), "key")
        for owner, y in seeds.items():
            self._seed_shares[owner][i] = y
        for owner, y in keys.items():
            self._key_shares[owner][i] = y

    @staticmethod
    def _read_shares(shares: Iterable[secagg_pb2.SecAggShare], owners: set[int], what: str) -> dict[int, int]:
        out: dict[int, int] = {}
        for share in shares:
            if share.owner not in owners or share.owner in out:
                raise ValueError(f"{what} share of #{share.owner}: not one it may hold, or repeated")
            out[share.owner] = shamir.from_bytes(share.value)
        return out

    def _drop(self, i: int, reason: str) -> None:
        """Exclude participant i; one whose masked input is in the sum is muted instead."""
        address = self._address[i]
        if i in self._contributors:
            self._muted.add(i)
            self.log.append((address, f"{reason}; later messages ignored, its masked input stays in the sum"))
            return
        self._excluded[address] = reason
        self._active.discard(i)
        self._responded.discard(i)
        if self._stage is Stage.ADVERTISE:
            self._keys.pop(i, None)
        self._ciphertexts.pop(i, None)

    # -- stage transitions ----------------------------------------------------------------------

    def _maybe_close(self, now: float) -> list[Action]:
        if self._outcome is not None:
            return []
        if self._stage is Stage.UNMASK:
            if self._recoverable():
                return self._finish()
            if self._active <= self._responded | self._muted:
                return self._abort(self._shortfall())
            return []
        if self._active <= self._responded | self._muted:
            return [CancelTimer(self._timer(self._stage)), *self._close(now)]
        return []

    def _close(self, now: float) -> list[Action]:
        if self._stage is Stage.ADVERTISE:
            return self._close_advertise(now)
        if self._stage is Stage.SHARE:
            return self._close_share(now)
        if self._stage is Stage.MASKED:
            return self._close_masked(now)
        return self._close_consistency(now)

    def _next(self, stage: Stage, awaited: Iterable[int], now: float) -> SetTimer:
        self._stage, self._active, self._responded = stage, set(awaited), set()
        return SetTimer(self._timer(stage), now + getattr(self._timeouts, stage.name.lower()))

    def _close_advertise(self, now: float) -> list[Action]:
        t = self._params.threshold
        advertised = set(self._responded)
        pruned = True
        while pruned:  # a participant needs t - 1 advertised neighbours to hold its shares
            pruned = False
            for i in sorted(advertised):
                if len(self._graph[i] & advertised) + 1 < t:
                    advertised.discard(i)
                    self._drop(i, f"too few neighbours advertised keys to hold {t} shares")
                    pruned = True
        if len(advertised) < self._required:
            return self._abort(
                f"{len(advertised)} participants advertised keys, below the quorum of {self._required}"
            )
        self._advertised = frozenset(advertised)
        actions: list[Action] = []
        for i in sorted(advertised):
            neighbours = [
                secagg_pb2.SecAggNeighbourKeys(
                    index=j,
                    cipher_public_key=self._keys[j].cipher_public_key,
                    mask_public_key=self._keys[j].mask_public_key,
                    seed_commitment=self._keys[j].seed_commitment if self._defended else b"",
                    certificate=self._keys[j].certificate,
                    signature=self._keys[j].signature,
                )
                for j in sorted(self._graph[i] & advertised)
            ]
            roster = secagg_pb2.SecAggRoster(
                index=i,
                threshold=t,
                degree=self._params.degree,
                bits=self._params.codec.bits,
                neighbours=neighbours,
            )
            actions.append(Send(self._address[i], self._message(roster=roster)))
        actions.append(self._next(Stage.SHARE, advertised, now))
        return actions

    def _close_share(self, now: float) -> list[Action]:
        shared = frozenset(self._responded)
        if len(shared) < self._required:
            return self._abort(
                f"{len(shared)} participants shared keys, below the quorum of {self._required}"
            )
        self._shared = shared
        actions: list[Action] = []
        for j in sorted(shared):
            forwarded = [
                secagg_pb2.SecAggEncryptedShare(index=i, ciphertext=self._ciphertexts[i][j])
                for i in sorted(self._graph[j] & shared)
            ]
            body = secagg_pb2.SecAggForwardedShares(shares=forwarded)
            actions.append(Send(self._address[j], self._message(forwarded_shares=body)))
        self._ciphertexts.clear()
        self._sum = np.zeros(self._dim, dtype=self._params.codec.dtype)
        actions.append(self._next(Stage.MASKED, shared, now))
        return actions

    def _close_masked(self, now: float) -> list[Action]:
        survivors = frozenset(self._contributors)
        if len(survivors) < self._required:
            return self._abort(f"{len(survivors)} masked inputs, below the quorum of {self._required}")
        if not connected(survivors, self._graph):
            return self._abort(
                "the survivors' neighbour graph is disconnected: unmasking would reveal partial sums"
            )
        self._dropped = tuple(j for j in sorted(self._shared - survivors) if self._graph[j] & survivors)
        self._seed_shares = {i: {} for i in survivors}
        self._key_shares = {j: {} for j in self._dropped}
        awaited = sorted(survivors - self._muted)
        if not self._defended:
            return self._request_unmask(awaited, [], now)
        request = secagg_pb2.SecAggConsistencyRequest(survivors=sorted(survivors))
        actions: list[Action] = [
            Send(self._address[i], self._message(consistency_request=request)) for i in awaited
        ]
        actions.append(self._next(Stage.CONSISTENCY, awaited, now))
        return actions

    def _close_consistency(self, now: float) -> list[Action]:
        signed = sorted(self._signatures)
        if len(signed) < self._params.threshold:
            return self._abort(
                f"{len(signed)} participants signed the survivor set, below the threshold {self._params.threshold}"
            )
        signatures = [
            secagg_pb2.SecAggSurvivorSignature(
                index=i, certificate=self._keys[i].certificate, signature=self._signatures[i]
            )
            for i in signed
        ]
        return self._request_unmask(signed, signatures, now)

    def _request_unmask(
        self, awaited: list[int], signatures: list[secagg_pb2.SecAggSurvivorSignature], now: float
    ) -> list[Action]:
        request = secagg_pb2.SecAggUnmaskRequest(
            dropped=self._dropped, survivors=sorted(self._contributors), signatures=signatures
        )
        actions: list[Action] = [
            Send(self._address[i], self._message(unmask_request=request)) for i in awaited
        ]
        actions.append(self._next(Stage.UNMASK, awaited, now))
        return actions

    # -- unmasking ------------------------------------------------------------------------------

    def _recoverable(self) -> bool:
        t = self._params.threshold
        return all(len(s) >= t for s in self._seed_shares.values()) and all(
            len(s) >= t for s in self._key_shares.values()
        )

    def _shortfall(self) -> str:
        t = self._params.threshold
        short = sum(len(s) < t for s in (*self._seed_shares.values(), *self._key_shares.values()))
        return f"unmasking failed: {short} secrets have fewer than {t} shares"

    def _finish(self) -> list[Action]:
        t, survivors = self._params.threshold, sorted(self._seed_shares)
        masks: list[tuple[bytes, int]] = []
        try:
            for i in survivors:
                seed = shamir.combine(_first(self._seed_shares[i], t))
                try:
                    if crypto.seed_commitment(seed, self.round_id) != self._keys[i].seed_commitment:
                        raise ValueError(f"the seed of #{i} does not match its commitment")
                    masks.append((crypto.derive_key(seed, self.round_id, crypto.Purpose.SELF_MASK, i, 0), -1))
                finally:
                    seed[:] = bytes(len(seed))
            for j in self._dropped:
                secret = shamir.combine(_first(self._key_shares[j], t))
                key = crypto.private_key(secret)
                secret[:] = bytes(len(secret))
                if crypto.public_bytes(key) != self._keys[j].mask_public_key:
                    raise ValueError(f"the key of #{j} does not match its public key")
                for i in sorted(self._graph[j] & self._contributors):
                    sign = 1 if i < j else -1  # the sign of the (i, j) mask in i's input
                    shared = crypto.agree(key, self._keys[i].mask_public_key)
                    masks.append((crypto.pair_key(shared, self.round_id, i, j), -sign))
        except ValueError as e:
            masks.clear()
            return self._abort(f"unmasking failed: {e}")
        assert self._sum is not None
        crypto.apply_masks(self._sum, masks, self._chunk)
        masks.clear()
        weights = [self._weights[self._address[i]] for i in survivors]
        total = self._params.codec.decode(self._sum)
        # Each input's norm is at most C, so ||sum w_i x_i|| <= sum max(1, w_i) * C, plus the
        # fixed-point error: beyond it, an input was out of range (it wrapped the ring).
        bound = sum(max(1.0, abs(w)) for w in weights) * self._norm_bound
        bound += self._params.codec.error_bound(len(survivors)) * math.sqrt(total.size)
        norm = float(np.linalg.norm(total))
        if not norm <= bound:
            return self._abort(
                f"the decoded sum's norm {norm:.6g} exceeds {len(survivors)} contributors x C = {bound:.6g}: "
                "an input was out of range"
            )
        self._outcome = self._seal.seal(total, sum(weights), len(survivors))
        return self._end()

    def _abort(self, reason: str) -> list[Action]:
        self._outcome = AggregationAborted(reason)
        return self._end()

    def _end(self) -> list[Action]:
        """Erase the round's secrets and the running sum; cancel the pending deadline."""
        if self._sum is not None:
            self._sum.fill(0)
        self._sum = None
        self._seed_shares.clear()
        self._key_shares.clear()
        self._ciphertexts.clear()
        return [CancelTimer(self._timer(self._stage))]


class SecAggPlusClient(AggregationClient):
    """Participant side of one SecAgg+ round. Keeps a reference to `vector` until it masks it.

    A malformed or inconsistent server message, or an input it cannot encode, ends its
    participation (`failure`, nothing more sent); a neighbour's share that fails authentication
    is ignored and listed in `rejected`. Each refusal is also returned as an `Emit` event.
    """

    def __init__(
        self,
        server: str,
        request: device_pb2.AggregationRequest,
        vector: np.ndarray,
        provenance: int,
        config: SecAggPlusAggregator,
        contributors: int = 0,
    ) -> None:
        self._server = server
        self._contributors = contributors  # the quorum a boundary aggregate input guarantees
        self._round = request.round_id
        self._weight = float(request.weight)
        self._vector: np.ndarray | None = np.asarray(vector).reshape(-1)
        self._provenance = provenance
        self._chunk, self._entropy = config.chunk, config.entropy
        self._stochastic = config.stochastic_rounding
        self._defended, self._signer, self._verifier = config.defended, config.signer, config.verifier
        self.failure: str | None = None
        self.rejected: dict[int, str] = {}  # neighbour index -> why its shares were not kept
        self.refused_values = OutOfRange(0, 0, 0)  # what the input held that no encoding may carry
        self.log: list[str] = []
        self._events: list[Emit] = []  # refusals not yet returned to the caller
        try:
            if self._defended and self._signer is None:
                raise ValueError("a defended round needs this participant's certificate and key")
            self._params: RoundParameters | None = config.parameters(request.participants)
        except ValueError as e:
            self._params, self.failure = None, f"unusable aggregation request: {e}"
        self._awaiting: str | None = None
        self._index = 0
        self._cipher_key: X25519PrivateKey | None = None
        self._mask_key: X25519PrivateKey | None = None
        self._seed = bytearray()
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbour -> (c_pk, s_pk)
        self._certificates: dict[
            int, tuple[bytes, PublicKey]
        ] = {}  # defended: neighbour -> its certified key
        self._survivors: frozenset[int] | None = None  # defended: the survivor set it signed
        self._seed_shares: dict[int, int] = {}  # owner -> the share of owner's seed held here
        self._key_shares: dict[int, int] = {}
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def _send(self, **body: Message) -> list[PlaneAction]:
        return [Send(self._server, secagg_pb2.SecAggMessage(round_id=self._round, **body))]

    def _event(self, kind: str, **fields: object) -> Emit:
        return Emit(kind, {"round_id": self._round, **fields})

    def start(self, now: float) -> list[PlaneAction]:
        if self._params is None:
            self._done = True
            return [self._event("secagg_client_failure", reason=self.failure)] if self.failure else []
        if self._awaiting is not None or self._done:
            return []  # started already
        self._cipher_key = crypto.private_key(self._entropy(crypto.KEY_BYTES))
        self._mask_key = crypto.private_key(self._entropy(crypto.KEY_BYTES))
        self._seed = bytearray(self._entropy(crypto.KEY_BYTES))
        keys = secagg_pb2.SecAggAdvertiseKeys(
            cipher_public_key=crypto.public_bytes(self._cipher_key),
            mask_public_key=crypto.public_bytes(self._mask_key),
            seed_commitment=crypto.seed_commitment(self._seed, self._round),
        )
        if self._defended:
            keys.certificate = self._signer.certificate
            keys.signature = self._signer.sign(keys_message(self._round, keys))
        self._awaiting = "roster"
        return self._send(advertise_keys=keys)

    def receive(self, now: float, message: Message) -> list[PlaneAction]:
        if self._done:
            return []
        if not isinstance(message, secagg_pb2.SecAggMessage) or message.round_id != self._round:
            self.log.append(f"ignored {type(message).__name__}: not a SecAgg+ message of round {self._round}")
            return []
        kind = message.WhichOneof("body")
        if kind != self._awaiting:
            self.log.append(f"ignored {kind} while awaiting {self._awaiting}")
            return []
        handler = {
            "roster": self._on_roster,
            "forwarded_shares": self._on_forwarded,
            "consistency_request": self._on_consistency,
            "unmask_request": self._on_unmask,
        }[kind]
        try:
            actions = handler(getattr(message, kind))
        except InputRefused as e:
            self.failure, self.refused_values = str(e), e.counts
            self._erase()
            self._events.append(self._event("secagg_input_refused", **e.counts._asdict(), clip=e.clip))
            actions = []
        except ValueError as e:
            self.failure = f"{kind}: {e}"
            self._erase()
            self._events.append(self._event("secagg_client_failure", reason=self.failure))
            actions = []
        events, self._events = self._events, []
        return [*events, *actions]

    def _on_roster(self, roster: secagg_pb2.SecAggRoster) -> list[PlaneAction]:
        assert self._params is not None and self._cipher_key is not None and self._mask_key is not None
        p = self._params
        if (roster.threshold, roster.degree, roster.bits) != (p.threshold, p.degree, p.codec.bits):
            raise ValueError(
                f"roster's (t, k, bits) = ({roster.threshold}, {roster.degree}, {roster.bits}) differ from "
                f"({p.threshold}, {p.degree}, {p.codec.bits})"
            )
        i = roster.index
        if not 1 <= i <= p.participants:
            raise ValueError(f"index {i} outside 1..{p.participants}")
        allowed = neighbour_graph(self._round, p.participants, p.degree)[i]
        peers: dict[int, tuple[bytes, bytes]] = {}
        for nb in roster.neighbours:
            if nb.index not in allowed or nb.index in peers:
                raise ValueError(f"#{nb.index} is not a neighbour of #{i}, or repeated")
            if self._defended:
                self._check_neighbour(nb)
            peers[nb.index] = (nb.cipher_public_key, nb.mask_public_key)
        if len(peers) + 1 < p.threshold:
            raise ValueError(f"{len(peers)} neighbours cannot hold {p.threshold} shares")
        self._index, self._peers = i, peers
        holders = [*sorted(peers), i]
        seed_shares = shamir.split(bytes(self._seed), p.threshold, holders, self._entropy)
        key_shares = shamir.split(self._mask_key.private_bytes_raw(), p.threshold, holders, self._entropy)
        self._seed_shares[i], self._key_shares[i] = seed_shares.pop(i), key_shares.pop(i)
        sealed = []
        for j in sorted(peers):
            key = crypto.derive_key(
                crypto.agree(self._cipher_key, peers[j][0]), self._round, crypto.Purpose.SHARE_TRANSPORT, i, j
            )
            pair = shamir.to_bytes(seed_shares[j]) + shamir.to_bytes(key_shares[j])
            ciphertext = crypto.seal(
                key, pair, crypto.share_aad(self._round, i, j), self._entropy(crypto.NONCE_BYTES)
            )
            sealed.append(secagg_pb2.SecAggEncryptedShare(index=j, ciphertext=ciphertext))
        seed_shares.clear()
        key_shares.clear()
        self._awaiting = "forwarded_shares"
        return self._send(share_keys=secagg_pb2.SecAggShareKeys(shares=sealed))

    def _check_neighbour(self, nb: secagg_pb2.SecAggNeighbourKeys) -> None:
        """A defended round: the neighbour's keys are signed by a certified peer of this one,
        and no certificate stands for two participants."""
        mine = fingerprint(self._signer.certificate)
        seen = {fingerprint(c) for c, _ in self._certificates.values()}
        if fingerprint(nb.certificate) in seen | {mine}:
            raise ValueError(f"#{nb.index} presents a certificate of another participant")
        key = self._verifier.peer(nb.certificate, self._signer)
        try:
            verify_signature(key, nb.signature, keys_message(self._round, nb))
        except ValueError:
            raise ValueError(f"the keys of #{nb.index} do not carry its signature (substituted?)") from None
        self._certificates[nb.index] = (nb.certificate, key)

    def _on_forwarded(self, forwarded: secagg_pb2.SecAggForwardedShares) -> list[PlaneAction]:
        assert self._cipher_key is not None and self._params is not None
        i, senders = self._index, []
        for share in forwarded.shares:
            j = share.index
            if j not in self._peers or j in senders:
                raise ValueError(f"shares from #{j}: not a neighbour, or repeated")
            senders.append(j)
            try:
                key = crypto.derive_key(
                    crypto.agree(self._cipher_key, self._peers[j][0]),
                    self._round,
                    crypto.Purpose.SHARE_TRANSPORT,
                    j,
                    i,
                )
                pair = crypto.unseal(key, share.ciphertext, crypto.share_aad(self._round, j, i))
                if len(pair) != 2 * shamir.SHARE_BYTES:
                    raise ValueError(f"share pair of {len(pair)} B")
                seed_y, key_y = (
                    shamir.from_bytes(pair[: shamir.SHARE_BYTES]),
                    shamir.from_bytes(pair[shamir.SHARE_BYTES :]),
                )
            except ValueError as e:
                self.rejected[j] = str(e)
                self._events.append(self._event("secagg_share_rejected", neighbour=j, reason=str(e)))
                continue
            self._seed_shares[j], self._key_shares[j] = seed_y, key_y
        valid = len(self._key_shares) - 1
        if valid < self._params.threshold - 1:
            # With fewer pairwise masks the server could reconstruct this input from the self-mask alone.
            raise ValueError(
                f"valid shares from {valid} neighbours, below t - 1 = {self._params.threshold - 1}"
            )
        masked = self._mask(senders)
        self._seed[:] = bytes(len(self._seed))
        self._cipher_key = self._mask_key = None
        self._vector = None
        self._awaiting = "consistency_request" if self._defended else "unmask_request"
        return self._send(masked_input=secagg_pb2.SecAggMaskedInput(masked=masked))

    def _mask(self, neighbours: list[int]) -> tensor_pb2.TensorPayload:
        """The encoded w_i * x_i plus the self mask and the masks shared with `neighbours`.

        InputRefused when w_i * x_i holds a NaN, an infinity or a value beyond the clip.
        """
        assert self._params is not None and self._vector is not None and self._mask_key is not None
        codec, i, chunk = self._params.codec, self._index, self._chunk
        rng = np.random.default_rng(int.from_bytes(self._entropy(16), "little")) if self._stochastic else None
        x = self._vector
        y = np.empty(x.size, dtype=codec.dtype)
        refused = OutOfRange(0, 0, 0)
        for start in range(0, x.size, chunk):
            weighted = x[start : start + chunk].astype(np.float64) * self._weight
            counts = codec.out_of_range(weighted)
            refused += counts
            if not refused.total:
                y[start : start + chunk] = codec.encode(weighted, rng)
        if refused.total:
            y.fill(0)
            raise InputRefused(refused, codec.clip)
        masks = [(crypto.derive_key(self._seed, self._round, crypto.Purpose.SELF_MASK, i, 0), 1)]
        for j in neighbours:
            secret = crypto.agree(self._mask_key, self._peers[j][1])
            masks.append((crypto.pair_key(secret, self._round, i, j), 1 if i < j else -1))
        crypto.apply_masks(y, masks, chunk)
        masks.clear()
        return tensor_pb2.TensorPayload(
            provenance=self._provenance,
            contributors=self._contributors,
            dtype=RING_DTYPE[codec.bits],
            numel=y.size,
            data=y.tobytes(),
        )

    def _check_survivors(self, survivors: list[int]) -> frozenset[int]:
        assert self._params is not None
        members = frozenset(survivors)
        if len(members) != len(survivors):
            raise ValueError("repeated index")
        if not members <= set(range(1, self._params.participants + 1)):
            raise ValueError("index out of range")
        if self._index not in members:
            raise ValueError("this participant is not listed among the survivors")
        if len(members) < self._params.threshold:
            raise ValueError(f"{len(members)} survivors, below the threshold {self._params.threshold}")
        return members

    def _on_consistency(self, request: secagg_pb2.SecAggConsistencyRequest) -> list[PlaneAction]:
        """A defended round: sign the survivor set, once; shares are revealed only for it."""
        self._survivors = self._check_survivors(list(request.survivors))
        signature = self._signer.sign(survivors_message(self._round, self._survivors))
        self._awaiting = "unmask_request"
        return self._send(consistency_response=secagg_pb2.SecAggConsistencyResponse(signature=signature))

    def _check_signatures(self, request: secagg_pb2.SecAggUnmaskRequest) -> None:
        """A defended round: at least t distinct certified participants signed the survivor set
        this participant signed."""
        assert self._params is not None and self._survivors is not None
        if frozenset(request.survivors) != self._survivors:
            raise ValueError("the survivor set differs from the one this participant signed")
        message = survivors_message(self._round, self._survivors)
        indices, certificates = set(), set()
        for entry in request.signatures:
            if entry.index not in self._survivors or entry.index in indices:
                raise ValueError(f"a signature of #{entry.index}: not a survivor, or repeated")
            known = (
                (self._signer.certificate, self._signer.public_key)
                if entry.index == self._index
                else self._certificates.get(entry.index)
            )
            if known is not None and entry.certificate != known[0]:
                raise ValueError(f"the signature of #{entry.index} comes with another certificate")
            key = known[1] if known is not None else self._verifier.peer(entry.certificate, self._signer)
            if fingerprint(entry.certificate) in certificates:
                raise ValueError("one certificate signed for two participants")
            verify_signature(key, entry.signature, message)
            indices.add(entry.index)
            certificates.add(fingerprint(entry.certificate))
        if len(indices) < self._params.threshold:
            raise ValueError(f"{len(indices)} signatures on the survivor set, below the threshold")

    def _on_unmask(self, request: secagg_pb2.SecAggUnmaskRequest) -> list[PlaneAction]:
        assert self._params is not None
        if self._defended:
            self._check_signatures(request)
        dropped, survivors = set(request.dropped), self._check_survivors(list(request.survivors))
        if len(dropped) != len(request.dropped):
            raise ValueError("repeated index")
        if dropped & survivors:
            raise ValueError("a participant is listed both as dropped and as a survivor")
        if not dropped <= set(range(1, self._params.participants + 1)):
            raise ValueError("index out of range")
        response = secagg_pb2.SecAggUnmaskResponse(
            seed_shares=[
                secagg_pb2.SecAggShare(owner=o, value=shamir.to_bytes(y))
                for o, y in sorted(self._seed_shares.items())
                if o in survivors
            ],
            key_shares=[
                secagg_pb2.SecAggShare(owner=o, value=shamir.to_bytes(y))
                for o, y in sorted(self._key_shares.items())
                if o in dropped
            ],
        )
        self._erase()
        return self._send(unmask_response=response)

    def _erase(self) -> None:
        """Forget every secret and share of this round; the participant is done."""
        self._seed[:] = bytes(len(self._seed))
        self._cipher_key = self._mask_key = None
        self._vector = None
        self._seed_shares.clear()
        self._key_shares.clear()
        self._done = True


class InputRefused(ValueError):
    """A participant's weighted input holds values no encoding may carry; it submits nothing."""

    def __init__(self, counts: OutOfRange, clip: float) -> None:
        self.counts, self.clip = counts, clip
        super().__init__(
            f"input refused: {counts.nan} NaN, {counts.inf} infinite and {counts.beyond_clip} values beyond "
            f"+-{clip} (never clipped or zeroed)"
        )
