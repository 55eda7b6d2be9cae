"""Who may send what across a boundary, and the shape it must have: one run's contract terms.

The schema (`echelon.contract.rules`) says what a message may hold; these terms say which party
may send it and what a run's messages must look like:

- `SENDS`: the envelope bodies each role sends (the other role receives exactly these). A
  boundary sends status, its Delta_b and its part of the outer SecAgg+ round; the global plane
  sends sync requests, references, the cadence and the server's part of that round. A boundary
  never sends GLOBAL, the global plane never sends a boundary aggregate.
- `OUTER_SENDS`: inside `OuterAggregation`, the request and SecAgg+ bodies each role sends.
- `TENSORS`: where a tensor may sit, its provenance and dtypes. A BOUNDARY_AGGREGATE meets the
  quorum; a float aggregate must be one the sending boundary minted (`Ledger`, checked by its
  egress guard); the outer round carries only ring elements (UINT32/UINT64).
- `Terms.problems`: every tensor has exactly the model's (or the synchronised fragment's) length;
  fragment indices and outer steps agree; in the outer round every index names one of the n
  boundaries, every list holds at most n entries, and keys, shares and ciphertexts have their
  exact sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from echelon.contract.rules import limits, tensors
from echelon.parties import BOUNDARY, GLOBAL, boundary_id_of
from echelon.tensors import ITEMSIZE, fragment_bounds, whole_numel
from echelon.v1 import boundary_pb2, tensor_pb2

SENDS: dict[str, frozenset[str]] = {
    BOUNDARY: frozenset({"status", "boundary_delta", "outer_aggregation"}),
    GLOBAL: frozenset({"sync_request", "global_reference", "cadence", "outer_aggregation"}),
}
OUTER_SENDS: dict[str, frozenset[str]] = {
    BOUNDARY: frozenset(
        {"advertise_keys", "share_keys", "masked_input", "consistency_response", "unmask_response"}
    ),
    GLOBAL: frozenset({"request", "roster", "forwarded_shares", "consistency_request", "unmask_request"}),
}


@dataclass(frozen=True)
class TensorTerms:
    sender: str
    provenance: int
    dtypes: frozenset[int]
    minted: bool  # the sender's ledger must have minted it (a float boundary aggregate)


TENSORS: dict[str, TensorTerms] = {
    "boundary_delta.delta": TensorTerms(
        BOUNDARY,
        tensor_pb2.BOUNDARY_AGGREGATE,
        frozenset({tensor_pb2.FLOAT32, tensor_pb2.BFLOAT16}),
        minted=True,
    ),
    "global_reference.parameters": TensorTerms(
        GLOBAL, tensor_pb2.GLOBAL, frozenset({tensor_pb2.FLOAT32}), minted=False
    ),
    "outer_aggregation.secagg.masked_input.masked": TensorTerms(
        BOUNDARY,
        tensor_pb2.BOUNDARY_AGGREGATE,
        frozenset({tensor_pb2.UINT32, tensor_pb2.UINT64}),
        minted=False,
    ),
}
# Outer round fields naming a participant (1..n), and fields of one exact size (their max_bytes).
INDEX_FIELDS = frozenset({"index", "owner", "dropped", "survivors"})
EXACT_FIELDS = frozenset({"cipher_public_key", "mask_public_key", "seed_commitment", "ciphertext", "value"})
SIGNATURE_BYTES = 64


def role_of(party: str) -> str:
    """`global` or `boundary` for a party name; ValueError for anything else."""
    if party == GLOBAL:
        return GLOBAL
    if boundary_id_of(party) is not None:
        return BOUNDARY
    raise ValueError(f"{party!r} is not a party that crosses a boundary (global or boundary.<id>)")


def body_of(envelope: boundary_pb2.CrossBoundaryEnvelope) -> Message:
    return getattr(envelope, envelope.WhichOneof("body"))


@dataclass(frozen=True)
class Terms:
    """One run's terms: the quorum, the exchanged vector's length `dim` in `fragments` parts
    (Streaming DiLoCo: a count of contiguous near-equal parts, or the parts' [lo, hi) ranges when
    they follow the model's layers), and the number of boundaries."""

    min_quorum: int
    dim: int
    fragments: int | tuple[tuple[int, int], ...] = 1
    boundaries: int = 1

    @cached_property
    def bounds(self) -> list[tuple[int, int]]:
        if isinstance(self.fragments, int):
            return fragment_bounds(self.dim, self.fragments)
        return list(self.fragments)

    @property
    def parts(self) -> int:
        """How many fragments the model is synchronised in."""
        return len(self.bounds)

    @property
    def max_tensor_bytes(self) -> int:
        """The largest tensor any message of this run may carry."""
        return self.dim * max(ITEMSIZE.values())

    def fragment_of(self, outer_step: int) -> int:
        """The fragment outer step `outer_step` (>= 1) synchronises: round robin."""
        return (outer_step - 1) % len(self.bounds)

    def numel(self, fragment: int) -> int:
        lo, hi = self.bounds[fragment]
        return hi - lo

    def problems(
        self,
        envelope: boundary_pb2.CrossBoundaryEnvelope,
        sender: str,
        found: list[tuple[str, tensor_pb2.TensorPayload]] | None = None,
    ) -> list[str]:
        """Every way `envelope`, sent by a party of role `sender`, breaks these terms.

        Call after `schema_problems` found none (the envelope is well formed); `found` is
        `tensors(envelope)` when the caller has it already.
        """
        field = envelope.WhichOneof("body")
        body = body_of(envelope)
        if field not in SENDS[sender]:
            return [f"a {sender} party may not send {body.DESCRIPTOR.full_name}"]
        out = self._tensor_problems(tensors(envelope) if found is None else found, sender)
        if envelope.HasField("audit_head") and len(envelope.audit_head.hash) != 32:
            out.append("envelope.audit_head: a chain head is a 32-byte SHA-256")
        check = getattr(self, f"_{field}", None)
        return out + (check(body, sender) if check else [])

    def _tensor_problems(self, found: list[tuple[str, tensor_pb2.TensorPayload]], sender: str) -> list[str]:
        out = []
        for path, t in found:
            terms = TENSORS.get(path)
            if terms is None or terms.sender != sender:
                out.append(f"{path}: a {sender} party may not send a tensor here")
                continue
            if t.provenance != terms.provenance:
                have = tensor_pb2.Provenance.Name(t.provenance)
                want = tensor_pb2.Provenance.Name(terms.provenance)
                out.append(f"{path}: tensor provenance {have} may not cross here (only {want})")
            elif t.provenance == tensor_pb2.BOUNDARY_AGGREGATE and t.contributors < self.min_quorum:
                out.append(
                    f"{path}: boundary aggregate of {t.contributors} contributors is below the quorum of "
                    f"{self.min_quorum}"
                )
            if t.dtype not in terms.dtypes:
                names = sorted(tensor_pb2.DType.Name(d) for d in terms.dtypes)
                out.append(
                    f"{path}: dtype {tensor_pb2.DType.Name(t.dtype)} may not cross here (only {names})"
                )
        return out

    def _numel_problem(self, what: str, t: tensor_pb2.TensorPayload, fragment: int) -> list[str]:
        expected = self.numel(fragment)
        if whole_numel(t) != expected:
            where = f"fragment {fragment} of {self.parts}" if self.parts > 1 else "the model"
            return [f"{what}: a tensor of {whole_numel(t)} elements where {where} has {expected}"]
        return []

    def _step_problem(self, outer_step: int) -> list[str]:
        return [] if outer_step >= 1 else [f"outer step {outer_step}: outer steps start at 1"]

    def _sync_request(self, body: boundary_pb2.SyncRequest, sender: str) -> list[str]:
        out = self._step_problem(body.outer_step)
        if self.parts == 1:
            if body.fragments > 1 or body.fragment:
                out.append(f"fragment {body.fragment} of {body.fragments} in a run without fragments")
        elif body.fragments != self.parts or body.fragment != self.fragment_of(body.outer_step):
            out.append(
                f"fragment {body.fragment} of {body.fragments}: outer step {body.outer_step} synchronises "
                f"fragment {self.fragment_of(max(body.outer_step, 1))} of {self.parts}"
            )
        return out

    def _boundary_delta(self, body: boundary_pb2.BoundaryDelta, sender: str) -> list[str]:
        out = self._step_problem(body.outer_step)
        if body.HasField("delta") and not out:
            out += self._numel_problem("delta", body.delta, self.fragment_of(body.outer_step))
            if body.delta.contributors != body.contributors:
                out.append(
                    f"contributors {body.contributors} differ from its tensor's {body.delta.contributors}"
                )
        return out

    def _global_reference(self, body: boundary_pb2.GlobalReference, sender: str) -> list[str]:
        if body.fragments <= 1:  # the whole vector (the start, a rejoin, a run without fragments)
            if body.fragment or whole_numel(body.parameters) != self.dim:
                return [
                    f"a whole reference (fragment {body.fragment}) of {whole_numel(body.parameters)} "
                    f"elements; the model has {self.dim}"
                ]
            return []
        if body.fragments != self.parts or body.fragment >= self.parts:
            return [f"fragment {body.fragment} of {body.fragments} in a run of {self.parts} fragments"]
        return self._numel_problem("parameters", body.parameters, body.fragment)

    def _cadence(self, body: boundary_pb2.CadenceUpdate, sender: str) -> list[str]:
        return [] if body.interval >= 1 else ["an outer interval H of 0 middle steps"]

    def _outer_aggregation(self, body: boundary_pb2.OuterAggregation, sender: str) -> list[str]:
        out = self._step_problem(body.outer_step)
        kind = body.WhichOneof("body")
        if kind == "secagg":
            kind = body.secagg.WhichOneof("body")
            if body.secagg.round_id != body.outer_step:
                out.append(
                    f"a SecAgg+ message of round {body.secagg.round_id} in outer step {body.outer_step}"
                )
        if kind not in OUTER_SENDS[sender]:
            return out + [f"a {sender} party may not send {kind or 'an empty message'} in the outer round"]
        if kind == "request":
            r = body.request
            if r.round_id != body.outer_step or not 1 <= r.participants <= self.boundaries:
                out.append(
                    f"an aggregation request for round {r.round_id} of {r.participants} participants in "
                    f"outer step {body.outer_step} of a run of {self.boundaries} boundaries"
                )
            return out
        if kind == "masked_input" and not out:
            masked = body.secagg.masked_input.masked
            out += self._numel_problem("masked input", masked, self.fragment_of(body.outer_step))
        return out + self._round_shape(body.secagg, "secagg")

    def _round_shape(self, msg: Message, path: str) -> list[str]:
        """Outer round messages: indices within 1..n, at most n entries per list, exact sizes."""
        n, out = self.boundaries, []
        for field, value in msg.ListFields():
            where = f"{path}.{field.name}"
            values = value if field.is_repeated else (value,)
            if field.is_repeated and len(values) > n:
                out.append(f"{where}: {len(values)} entries in a round of {n} boundaries")
            if field.name in INDEX_FIELDS and any(not 1 <= v <= n for v in values):
                out.append(f"{where}: an index outside 1..{n}")
            if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.name != "TensorPayload":
                for i, v in enumerate(values):
                    out += self._round_shape(v, f"{where}[{i}]" if field.is_repeated else where)
            elif field.name in EXACT_FIELDS and any(len(v) != limits(field)[0] for v in values):
                out.append(f"{where}: must be exactly {limits(field)[0]} B")
            elif field.name == "signature" and any(len(v) not in (0, SIGNATURE_BYTES) for v in values):
                out.append(f"{where}: a signature is {SIGNATURE_BYTES} B")
        return out
