"""Flat parameter vectors on the wire: arrays and tensors <-> TensorPayload, and fragments.

A payload's provenance is a claim the contract checks; these helpers write only the two claims
that need no proof, DEVICE (a device's own state) and GLOBAL (the global plane's reference).
A BOUNDARY_AGGREGATE payload is minted only by `echelon.contract.provenance.BoundaryModel`, from
sealed aggregation results, and the egress guard refuses any other (see docs/audit.md).
This module sits below both the contract and the planes: it imports neither.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from echelon.v1 import tensor_pb2

ITEMSIZE = {tensor_pb2.FLOAT32: 4, tensor_pb2.UINT32: 4, tensor_pb2.UINT64: 8, tensor_pb2.BFLOAT16: 2}
FREE_PROVENANCE = frozenset({tensor_pb2.DEVICE, tensor_pb2.GLOBAL})


Bounds = list[tuple[int, int]]  # [lo, hi) of each fragment of a flat vector, in order, covering it


def fragment_bounds(dim: int, fragments: int) -> Bounds:
    """[lo, hi) of each of `fragments` contiguous, near-equal fragments of a `dim`-vector."""
    edges = [round(i * dim / fragments) for i in range(fragments + 1)]
    return list(itertools.pairwise(edges))


def whole_numel(t: tensor_pb2.TensorPayload) -> int:
    """The length of the whole tensor a payload (or a slice of it) belongs to."""
    return t.total_numel or t.numel


def float_problem(
    t: tensor_pb2.TensorPayload, numel: int, data: bytes | memoryview | None = None
) -> str | None:
    """Why `t` is not a whole FLOAT32 or BFLOAT16 vector of `numel` elements, or None.

    `data`: `t`'s data when it is held apart from it (`t` then holds none).
    """
    return _float_problem(t, len(t.data if data is None else data), numel)


def _float_problem(t: tensor_pb2.TensorPayload, nbytes: int, numel: int) -> str | None:
    if t.offset or t.total_numel:
        return f"a slice (offset {t.offset} of {t.total_numel}) is not a whole tensor"
    if t.dtype not in (tensor_pb2.FLOAT32, tensor_pb2.BFLOAT16) or nbytes != t.numel * ITEMSIZE[t.dtype]:
        return f"malformed float payload: dtype {t.dtype}, {nbytes} B, numel {t.numel}"
    if t.numel != numel:
        return f"a vector of {t.numel} elements where {numel} are expected"
    return None


def float_data(values: np.ndarray, dtype: int = tensor_pb2.FLOAT32) -> tuple[int, bytes]:
    """(numel, data) of a 1-D float array as a FLOAT32 or BFLOAT16 (round to nearest even) payload."""
    if dtype == tensor_pb2.FLOAT32:
        v = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    elif dtype == tensor_pb2.BFLOAT16:
        t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        v = t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    else:
        raise ValueError(f"cannot encode a float vector as dtype {dtype}")
    return v.size, v.tobytes()


def payload(
    values: np.ndarray, provenance: int, contributors: int = 0, dtype: int = tensor_pb2.FLOAT32
) -> tensor_pb2.TensorPayload:
    """A FLOAT32 or BFLOAT16 (round to nearest even) payload of a 1-D float array, any provenance.

    For the contract's own minting (`echelon.contract.provenance`); everyone else calls `encode`.
    """
    numel, data = float_data(values, dtype)
    return tensor_pb2.TensorPayload(
        provenance=provenance, contributors=contributors, dtype=dtype, numel=numel, data=data
    )


def encode(
    values: np.ndarray | torch.Tensor, provenance: int, dtype: int = tensor_pb2.FLOAT32
) -> tensor_pb2.TensorPayload:
    """A DEVICE or GLOBAL payload of a flat vector; ValueError for any other provenance."""
    header, data = encode_apart(values, provenance, dtype)
    header.data = data
    return header


def encode_apart(
    values: np.ndarray | torch.Tensor, provenance: int, dtype: int = tensor_pb2.FLOAT32
) -> tuple[tensor_pb2.TensorPayload, bytes]:
    """`encode`, its data held apart: (the payload holding no data, the data), for a `Send`."""
    if provenance not in FREE_PROVENANCE:
        raise ValueError(
            "encode makes DEVICE or GLOBAL payloads; boundary aggregates are minted only by "
            "echelon.contract.provenance.BoundaryModel from sealed aggregation results"
        )
    if isinstance(values, torch.Tensor):
        values = values.detach().numpy()
    numel, data = float_data(values, dtype)
    return tensor_pb2.TensorPayload(provenance=provenance, dtype=dtype, numel=numel), data


def decode(t: tensor_pb2.TensorPayload, data: bytes | memoryview | None = None) -> np.ndarray:
    """The 1-D float32 array of a whole (unsliced) FLOAT32 or BFLOAT16 payload; `data`: its data
    when held apart from it (`t` then holds none).

    FLOAT32 gives a read-only view of the bytes; ValueError when the payload is malformed.
    """
    raw = t.data if data is None else data  # read once: every read of a protobuf bytes field copies
    problem = _float_problem(t, len(raw), t.numel)
    if problem is not None:
        raise ValueError(problem)
    if t.dtype == tensor_pb2.FLOAT32:
        return np.frombuffer(raw, dtype="<f4")
    half = torch.from_numpy(np.frombuffer(raw, dtype="<i2").copy())
    return half.view(torch.bfloat16).float().numpy()


def to_tensor(t: tensor_pb2.TensorPayload, data: bytes | memoryview | None = None) -> torch.Tensor:
    """A new flat float32 tensor from a FLOAT32 or BFLOAT16 payload (`data`: as `decode`);
    ValueError when malformed."""
    return torch.from_numpy(np.array(decode(t, data), dtype=np.float32))
