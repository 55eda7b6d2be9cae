"""What the wire schema says about a recorded message type, read from the proto descriptors.

A crossing is allowed only for a type declared in the `echelon.v1` descriptors that is one of the
`CrossBoundaryEnvelope.body` fields, whose declared flow class crosses and equals the recorded
one, and whose tensor (if any) has BOUNDARY_AGGREGATE or GLOBAL provenance. Nothing here is a
hard-coded list of types: new messages added to the protos are judged by their own options.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor

import echelon.v1
from echelon.v1 import options_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES

PACKAGE = "echelon.v1"
CROSSING_CLASSES = frozenset({"AGGREGATE", "CONTROL", "TELEMETRY", "AUDIT"})
PER_DEVICE_CLASS = "DEVICE_LOCAL"
CROSSING_PROVENANCE = frozenset({"BOUNDARY_AGGREGATE", "GLOBAL"})
PER_DEVICE_PROVENANCE = "DEVICE"
FLOW_CLASSES = frozenset(options_pb2.FlowClass.keys())
PROVENANCES = frozenset(tensor_pb2.Provenance.keys())


@dataclass(frozen=True)
class Verdict:
    """The contract's view of one crossing: its problems, and whether it carried per-device payload."""

    problems: tuple[str, ...]
    per_device: bool


@cache
def _registered() -> None:
    """Import every generated `echelon.v1` module so the descriptor pool holds all declared types."""
    for info in pkgutil.iter_modules(echelon.v1.__path__):
        if info.name.endswith("_pb2"):
            importlib.import_module(f"echelon.v1.{info.name}")


def _descriptor(message_type: str) -> Descriptor | None:
    _registered()
    try:
        desc = descriptor_pool.Default().FindMessageTypeByName(message_type)
    except KeyError:
        return None
    return desc if desc.file.package == PACKAGE else None


def declared_flow_class(desc: Descriptor) -> str:
    return options_pb2.FlowClass.Name(desc.GetOptions().Extensions[options_pb2.flow_class])


def _holds_tensor(desc: Descriptor) -> bool:
    return any(
        f.message_type is not None
        and f.message_type.full_name == tensor_pb2.TensorPayload.DESCRIPTOR.full_name
        for f in desc.fields
    )


@cache
def judge_crossing(message_type: str, flow_class: str, provenance: str | None) -> Verdict:
    """The contract's verdict on a message of `message_type` recorded as sent or received.

    A crossing counts as per-device payload when the type or the recorded class is DEVICE_LOCAL,
    the provenance is DEVICE, or the type is unknown to the schema (nothing shows it aggregate-only).
    """
    problems: list[str] = []
    per_device = flow_class == PER_DEVICE_CLASS or provenance == PER_DEVICE_PROVENANCE
    if flow_class not in FLOW_CLASSES:
        problems.append(f"flow class {flow_class!r} is not declared in the schema")
    if provenance is not None and provenance not in PROVENANCES:
        problems.append(f"provenance {provenance!r} is not declared in the schema")
    desc = _descriptor(message_type)
    if desc is None:
        problems.append(
            f"{message_type} is not a message type of {PACKAGE}: its content cannot be shown aggregate"
        )
        return Verdict(tuple(problems), True)
    declared = declared_flow_class(desc)
    per_device = per_device or declared == PER_DEVICE_CLASS
    if message_type not in CROSS_BOUNDARY_BODIES:
        problems.append(f"{message_type} ({declared}) is not a CrossBoundaryEnvelope body: it may not cross")
    elif declared not in CROSSING_CLASSES:
        problems.append(f"{message_type} declares flow class {declared}, which may not cross")
    if flow_class != declared:
        problems.append(f"recorded flow class {flow_class} but {message_type} declares {declared}")
    if provenance is not None:
        if not _holds_tensor(desc):
            problems.append(f"provenance {provenance} recorded for {message_type}, which holds no tensor")
        if provenance == PER_DEVICE_PROVENANCE:
            problems.append("a DEVICE tensor (one device's state or update) crossed a boundary")
        elif provenance not in CROSSING_PROVENANCE:
            problems.append(f"tensor provenance {provenance} may not cross a boundary")
    return Verdict(tuple(problems), per_device)
