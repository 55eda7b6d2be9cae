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


def from_payload(payload: tensor_pb2.TensorPayload) -> torch.Tensor:
    """A new flat float32 tensor from a FLOAT32 payload."""
    return torch.from_numpy(np.array(decode_f32(payload), dtype=np.float32))
