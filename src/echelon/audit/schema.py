"""What the wire schema says about a recorded message type, read from the proto descriptors.

A crossing is allowed only for a type declared in the `echelon.v1` descriptors that is one of the
`CrossBoundaryEnvelope.body` fields, that the sending party's role may send (the contract's table,
`echelon.contract.policy`), whose declared flow class crosses and equals the recorded one, and
whose tensor (if any, at any depth) has the provenance the contract gives it there: a boundary
never sends GLOBAL, the global plane never a boundary aggregate. Types and classes are read from
the descriptors: new messages added to the protos are judged by their own options.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import Descriptor

import echelon.v1
from echelon.contract.policy import SENDS, TENSORS, role_of
from echelon.contract.rules import CROSSING_CLASSES as CROSSING_CLASS_VALUES
from echelon.v1 import options_pb2, tensor_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES

PACKAGE = "echelon.v1"
CROSSING_CLASSES = frozenset(options_pb2.FlowClass.Name(c) for c in CROSSING_CLASS_VALUES)
PER_DEVICE_CLASS = "DEVICE_LOCAL"
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


def _sender_provenances(message_type: str, sender: str) -> frozenset[str]:
    """The provenances a tensor in a `message_type` body sent by `sender` may carry."""
    field = CROSS_BOUNDARY_BODIES.get(message_type)
    return frozenset(
        tensor_pb2.Provenance.Name(t.provenance)
        for path, t in TENSORS.items()
        if path.split(".", 1)[0] == field and t.sender == sender
    )


@cache
def judge_crossing(message_type: str, flow_class: str, provenance: str | None, sender: str) -> Verdict:
    """The contract's verdict on a message of `message_type` recorded as sent by party `sender`.

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
    role = role_of(sender)
    if message_type not in CROSS_BOUNDARY_BODIES:
        problems.append(f"{message_type} ({declared}) is not a CrossBoundaryEnvelope body: it may not cross")
    elif declared not in CROSSING_CLASSES:
        problems.append(f"{message_type} declares flow class {declared}, which may not cross")
    elif CROSS_BOUNDARY_BODIES[message_type] not in SENDS[role]:
        problems.append(f"a {role} party may not send {message_type}")
    if flow_class != declared:
        problems.append(f"recorded flow class {flow_class} but {message_type} declares {declared}")
    if provenance is not None:
        allowed = _sender_provenances(message_type, role)
        if provenance == PER_DEVICE_PROVENANCE:
            problems.append("a DEVICE tensor (one device's state or update) crossed a boundary")
        elif provenance not in allowed:
            problems.append(f"a {role} party may not send a {provenance} tensor in {message_type}")
    return Verdict(tuple(problems), per_device)
