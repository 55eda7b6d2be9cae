"""Flat parameter vectors on the wire: torch tensors <-> TensorPayload, with provenance."""

from __future__ import annotations

import numpy as np
import torch

from echelon.planes.aggregation import decode_f32, encode_f32
from echelon.v1 import tensor_pb2


def to_payload(theta: torch.Tensor, provenance: int, contributors: int = 0) -> tensor_pb2.TensorPayload:
    """A FLOAT32 payload holding a flat tensor."""
    return encode_f32(theta.detach().numpy(), provenance, contributors)


def from_payload(payload: tensor_pb2.TensorPayload) -> torch.Tensor:
    """A new flat float32 tensor from a FLOAT32 payload."""
    return torch.from_numpy(np.array(decode_f32(payload), dtype=np.float32))
