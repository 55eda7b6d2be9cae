"""Flat parameter vectors on the wire: torch tensors <-> TensorPayload, with provenance."""

from __future__ import annotations

import numpy as np
import torch

from echelon.planes.aggregation import decode_f32, encode_f32
from echelon.v1 import tensor_pb2


def to_payload(theta: torch.Tensor, provenance: int) -> tensor_pb2.TensorPayload:
    """A FLOAT32 payload holding a flat DEVICE or GLOBAL tensor.

    Boundary aggregates are built only by `echelon.contract.provenance.BoundaryModel`.
    """
    if provenance not in (tensor_pb2.DEVICE, tensor_pb2.GLOBAL):
        raise ValueError(
            "to_payload makes DEVICE or GLOBAL payloads; boundary aggregates come from BoundaryModel"
        )
    return encode_f32(theta.detach().numpy(), provenance)


def encode_tensor(
    theta: torch.Tensor, provenance: int, contributors: int = 0, dtype: int = tensor_pb2.FLOAT32
) -> tensor_pb2.TensorPayload:
    """A FLOAT32 or BFLOAT16 payload of a flat tensor (bfloat16: round to nearest even)."""
    if dtype == tensor_pb2.FLOAT32:
        return encode_f32(theta.detach().numpy(), provenance, contributors)
    if dtype != tensor_pb2.BFLOAT16:
        raise ValueError(f"cannot encode a float tensor as dtype {dtype}")
    half = theta.detach().reshape(-1).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    return tensor_pb2.TensorPayload(
        provenance=provenance, contributors=contributors, dtype=dtype, numel=half.size, data=half.tobytes()
    )


def from_payload(payload: tensor_pb2.TensorPayload) -> torch.Tensor:
    """A new flat float32 tensor from a FLOAT32 or BFLOAT16 payload."""
    if payload.dtype == tensor_pb2.BFLOAT16:
        if len(payload.data) != 2 * payload.numel:
            raise ValueError(f"malformed BFLOAT16 payload: {len(payload.data)} B, numel {payload.numel}")
        half = torch.from_numpy(np.frombuffer(payload.data, dtype="<i2").copy())
        return half.view(torch.bfloat16).float()
    return torch.from_numpy(np.array(decode_f32(payload), dtype=np.float32))
