"""A malicious SecAgg+ server: three ways to recover one participant's exact input.

Each attack is a harness hook that rewrites what the (honest) server sends and collects what the
participants answer; `recover` then tries to unmask the victim's masked input from the loot:

- inconsistent survivor lists: some neighbours are told the victim dropped (they reveal its mask
  key's shares), the others that it survived (they reveal its self-mask seed's shares);
- starvation: the victim is forwarded fewer than t - 1 shares, so it masks with (almost) nothing
  but its self-mask, whose seed the server then asks its neighbours for;
- key substitution: the victim's roster carries the attacker's keys for its neighbours, so the
  attacker decrypts the victim's shares and shares every pairwise mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from echelon.secagg import primitives as crypto
from echelon.secagg import shamir
from echelon.secagg.fixedpoint import FixedPoint
from echelon.v1 import secagg_pb2
from tests.secagg.harness import SERVER


@dataclass
class Loot:
    """What the attacker collected about its victim (index `victim`)."""

    victim: int
    index: dict[str, int]  # address -> index
    keys: dict[int, secagg_pb2.SecAggAdvertiseKeys] = field(default_factory=dict)
    masked: bytes | None = None
    masked_with: list[int] = field(default_factory=list)  # neighbours the victim's input is masked with
    seed_shares: dict[int, int] = field(default_factory=dict)  # holder -> share of the victim's seed
    key_shares: dict[int, int] = field(default_factory=dict)  # holder -> share of its mask key
    forged: dict[int, tuple[X25519PrivateKey, X25519PrivateKey]] = field(default_factory=dict)
    signatures: dict[int, secagg_pb2.SecAggConsistencyResponse] = field(default_factory=dict)

    def address(self, i: int) -> str:
        return next(a for a, j in self.index.items() if j == i)

    def collect(self, origin: str, message) -> None:
        """Everything a participant tells the server that helps against the victim."""
        if origin == SERVER or not isinstance(message, secagg_pb2.SecAggMessage):
            return
        i, kind = self.index[origin], message.WhichOneof("body")
        if kind == "advertise_keys":
            self.keys[i] = message.advertise_keys
        elif kind == "masked_input" and i == self.victim:
            self.masked = message.masked_input.masked.data
        elif kind == "consistency_response":
            self.signatures[i] = message.consistency_response
        elif kind == "unmask_response":
            for share in message.unmask_response.seed_shares:
                if share.owner == self.victim:
                    self.seed_shares[i] = shamir.from_bytes(share.value)
            for share in message.unmask_response.key_shares:
                if share.owner == self.victim:
                    self.key_shares[i] = shamir.from_bytes(share.value)


def _indices(names) -> dict[str, int]:
    return {a: i for i, a in enumerate(sorted(names), start=1)}


def recover(loot: Loot, round_id: int, codec: FixedPoint, t: int) -> np.ndarray | None:
    """The victim's weighted input w * x, or None when the loot cannot unmask it."""
    if loot.masked is None or len(loot.seed_shares) < t:
        return None
    seed = shamir.combine(dict(sorted(loot.seed_shares.items())[:t]))
    masks = [(crypto.derive_key(seed, round_id, crypto.Purpose.SELF_MASK, loot.victim, 0), -1)]
    v = loot.victim
    for j in loot.masked_with:
        if j in loot.forged:  # the attacker holds the other half of this pairwise key
            secret = crypto.agree(loot.forged[j][1], loot.keys[v].mask_public_key)
        elif len(loot.key_shares) >= t:
            key = crypto.private_key(shamir.combine(dict(sorted(loot.key_shares.items())[:t])))
            secret = crypto.agree(key, loot.keys[j].mask_public_key)
        else:
            return None
        masks.append((crypto.pair_key(secret, round_id, v, j), -1 if v < j else 1))
    y = np.frombuffer(loot.masked, dtype=codec.dtype).copy()
    crypto.apply_masks(y, masks)
    return codec.decode(y)


def inconsistent_lists(names, victim: int, told_dropped: set[int]):
    """Tell the neighbours in `told_dropped` that the victim dropped, the others that it survived
    (in the consistency round too, handing each group the signatures it gathered)."""
    loot = Loot(victim, _indices(names))
    injected = []

    def rewrite_unmask(request: secagg_pb2.SecAggUnmaskRequest, dropped_view: bool) -> None:
        if dropped_view:
            survivors = [j for j in request.survivors if j != victim]
            request.ClearField("survivors")
            request.survivors.extend(survivors)
            request.dropped.append(victim)
        if request.signatures:  # defended: the signatures the attacker gathered for this view
            group = told_dropped if dropped_view else set(loot.index.values()) - told_dropped
            request.ClearField("signatures")
            for j in sorted(group & set(loot.signatures)):
                request.signatures.add(
                    index=j, certificate=loot.keys[j].certificate, signature=loot.signatures[j].signature
                )

    def hook(origin, to, message):
        loot.collect(origin, message)
        if to == SERVER or not isinstance(message, secagg_pb2.SecAggMessage):
            return [(origin, message)]
        i, kind = loot.index[to], message.WhichOneof("body")
        dropped_view = i in told_dropped
        if kind == "forwarded_shares" and i == victim:
            loot.masked_with = [s.index for s in message.forwarded_shares.shares]
        if kind == "consistency_request" and dropped_view:
            survivors = [j for j in message.consistency_request.survivors if j != victim]
            message.consistency_request.ClearField("survivors")
            message.consistency_request.survivors.extend(survivors)
        if kind == "unmask_request" and message.unmask_request.signatures and not injected:
            # Defended: the server asks only those whose signature it verified; the attacker also
            # asks the others, each group with the signatures over its own view.
            injected.append(True)
            extra = []
            for j in sorted(told_dropped):
                forged = secagg_pb2.SecAggMessage()
                forged.CopyFrom(message)
                rewrite_unmask(forged.unmask_request, True)
                extra.append((origin, forged, loot.address(j)))
            if dropped_view:
                return extra
            rewrite_unmask(message.unmask_request, False)
            return [(origin, message), *extra]
        if kind == "unmask_request":
            rewrite_unmask(message.unmask_request, dropped_view)
        return [(origin, message)]

    return hook, loot


def starvation(names, victim: int, keep: int):
    """Forward the victim only `keep` of the shares its neighbours sent it."""
    loot = Loot(victim, _indices(names))

    def hook(origin, to, message):
        loot.collect(origin, message)
        if (
            to != SERVER
            and isinstance(message, secagg_pb2.SecAggMessage)
            and message.HasField("forwarded_shares")
            and loot.index[to] == victim
        ):
            shares = list(message.forwarded_shares.shares)[:keep]
            message.forwarded_shares.ClearField("shares")
            message.forwarded_shares.shares.extend(shares)
            loot.masked_with = [s.index for s in shares]
        return [(origin, message)]

    return hook, loot


def key_substitution(names, victim: int, round_id: int, entropy):
    """Give the victim the attacker's keys for every neighbour; read its shares, forge theirs."""
    loot = Loot(victim, _indices(names))

    def hook(origin, to, message):
        loot.collect(origin, message)
        if not isinstance(message, secagg_pb2.SecAggMessage):
            return [(origin, message)]
        kind = message.WhichOneof("body")
        if to != SERVER and loot.index[to] == victim and kind == "roster":
            for nb in message.roster.neighbours:
                c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
                loot.forged[nb.index] = (c, s)
                nb.cipher_public_key, nb.mask_public_key = crypto.public_bytes(c), crypto.public_bytes(s)
        if origin != SERVER and to == SERVER and loot.index[origin] == victim and kind == "share_keys":
            v_cpk = loot.keys[victim].cipher_public_key
            for share in message.share_keys.shares:
                j = share.index
                transport = crypto.derive_key(
                    crypto.agree(loot.forged[j][0], v_cpk),
                    round_id,
                    crypto.Purpose.SHARE_TRANSPORT,
                    victim,
                    j,
                )
                pair = crypto.unseal(transport, share.ciphertext, crypto.share_aad(round_id, victim, j))
                loot.seed_shares[j] = shamir.from_bytes(pair[: shamir.SHARE_BYTES])
        if to != SERVER and loot.index[to] == victim and kind == "forwarded_shares":
            message.forwarded_shares.ClearField("shares")
            v_cpk = loot.keys[victim].cipher_public_key
            for j, (c, _) in sorted(loot.forged.items()):
                transport = crypto.derive_key(
                    crypto.agree(c, v_cpk), round_id, crypto.Purpose.SHARE_TRANSPORT, j, victim
                )
                pair = shamir.to_bytes(1) + shamir.to_bytes(2)  # any share will do: it is never used
                sealed = crypto.seal(transport, pair, crypto.share_aad(round_id, j, victim), entropy(12))
                message.forwarded_shares.shares.add(index=j, ciphertext=sealed)
            loot.masked_with = sorted(loot.forged)
        return [(origin, message)]

    return hook, loot
