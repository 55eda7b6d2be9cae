"""Point-to-point transfers of the executor, and an optional trace of everything a rank exchanges.

The executor's own transfers (the cluster bridge, a linear replica's labels and loss) go through
`isend` / `irecv` here; `torch.distributed.pipelining` moves activations with
`dist.batch_isend_irecv` and its warm-up metadata with `dist.send`/`recv` and their object-list
forms. With ECHELON_TRACE_DIR set, `install_trace` wraps those and every transfer is appended to
`<device>.jsonl` (direction, peer rank, dtype, shape), with one line per raw-data read
(`data_loaded`). Tests read the traces to check where token ids and labels go.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

TRACE_ENV = "ECHELON_TRACE_DIR"
_trace: IO[str] | None = None


def _write(entry: dict) -> None:
    if _trace is not None:
        _trace.write(json.dumps(entry) + "\n")
        _trace.flush()


def _tensor_entry(kind: str, peer: int, tensor: torch.Tensor) -> dict:
    return {
        "kind": kind,
        "peer": peer,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }


def isend(tensor: torch.Tensor, dst: int) -> dist.Work:
    """Send `tensor` to global rank `dst` (asynchronously)."""
    _write(_tensor_entry("send", dst, tensor))
    return dist.isend(tensor.contiguous(), dst)


def irecv(tensor: torch.Tensor, src: int) -> dist.Work:
    """Receive into `tensor` from global rank `src` (asynchronously)."""
    _write(_tensor_entry("recv", src, tensor))
    return dist.irecv(tensor, src)


def data_loaded(what: str) -> None:
    """Note in the trace that this rank read raw data (token ids or labels)."""
    _write({"kind": "data", "what": what})


def install_trace(device: str) -> None:
    """Trace this process's transfers to ECHELON_TRACE_DIR/<device>.jsonl when the variable is set."""
    global _trace
    directory = os.environ.get(TRACE_ENV)
    if not directory or _trace is not None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    _trace = (Path(directory) / f"{device}.jsonl").open("a")

    def peer_of(group: dist.ProcessGroup | None, rank: int) -> int:
        return rank if group is None else dist.get_global_rank(group, rank)

    batch, send, recv = dist.batch_isend_irecv, dist.send, dist.recv
    send_objects, recv_objects = dist.send_object_list, dist.recv_object_list

    def traced_batch(ops):
        for op in ops:
            peer = op.peer if op.group is None else peer_of(op.group, op.group_peer)
            _write(_tensor_entry("send" if op.op is dist.isend else "recv", peer, op.tensor))
        return batch(ops)

    def traced_send(tensor, dst=None, group=None, *args, **kwargs):
        _write(_tensor_entry("send", dst, tensor))
        return send(tensor, dst, group, *args, **kwargs)

    def traced_recv(tensor, src=None, group=None, *args, **kwargs):
        _write(_tensor_entry("recv", src, tensor))
        return recv(tensor, src, group, *args, **kwargs)

    def traced_send_objects(objects, dst=None, *args, **kwargs):
        _write({"kind": "send", "peer": dst, "objects": [type(o).__name__ for o in objects]})
        return send_objects(objects, dst, *args, **kwargs)

    def traced_recv_objects(objects, src=None, *args, **kwargs):
        out = recv_objects(objects, src, *args, **kwargs)
        _write({"kind": "recv", "peer": src, "objects": [type(o).__name__ for o in objects]})
        return out

    dist.batch_isend_irecv, dist.send, dist.recv = traced_batch, traced_send, traced_recv
    dist.send_object_list, dist.recv_object_list = traced_send_objects, traced_recv_objects
