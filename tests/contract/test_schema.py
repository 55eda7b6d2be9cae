"""The wire schema declares a bound for everything that can cross, and the contract's table covers
every way across."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from echelon.contract.policy import OUTER_SENDS, SENDS, TENSORS
from echelon.contract.rules import CROSSING_CLASSES, TENSOR, flow_class, limits
from echelon.v1 import boundary_pb2, secagg_pb2
from echelon.wire import CROSS_BOUNDARY_BODIES


def _reachable(desc: Descriptor, seen: dict[str, Descriptor]) -> dict[str, Descriptor]:
    if desc.full_name in seen or desc is TENSOR:
        return seen
    seen[desc.full_name] = desc
    for field in desc.fields:
        if field.message_type is not None:
            _reachable(field.message_type, seen)
    return seen


CROSSING = _reachable(boundary_pb2.CrossBoundaryEnvelope.DESCRIPTOR, {})


def test_every_message_type_that_can_cross_declares_a_crossing_flow_class():
    assert "echelon.v1.SecAggRoster" in CROSSING and "echelon.v1.AuditHead" in CROSSING
    undeclared = [name for name, desc in CROSSING.items() if flow_class(desc) not in CROSSING_CLASSES]
    assert undeclared == []


def test_every_field_that_can_cross_is_bounded():
    unbounded = []
    for desc in CROSSING.values():
        for field in desc.fields:
            max_bytes, max_count = limits(field)
            if field.is_repeated and not max_count:
                unbounded.append(f"{field.full_name} (repeated)")
            if field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES) and not max_bytes:
                unbounded.append(f"{field.full_name} (bytes)")
    assert unbounded == []


def test_the_sender_table_covers_every_way_across_exactly_once():
    bodies = set(CROSS_BOUNDARY_BODIES.values())
    assert SENDS["boundary"] | SENDS["global"] == bodies
    assert SENDS["boundary"] & SENDS["global"] == {"outer_aggregation"}
    secagg_bodies = {f.name for f in secagg_pb2.SecAggMessage.DESCRIPTOR.oneofs_by_name["body"].fields}
    assert OUTER_SENDS["boundary"] | OUTER_SENDS["global"] == secagg_bodies | {"request"}
    assert not OUTER_SENDS["boundary"] & OUTER_SENDS["global"]
    # Every tensor path names a tensor field of the schema, and no party sends GLOBAL but the global plane.
    for path, terms in TENSORS.items():
        desc = boundary_pb2.CrossBoundaryEnvelope.DESCRIPTOR
        for name in path.split("."):
            desc = desc.fields_by_name[name].message_type
        assert desc is TENSOR, path
        assert (terms.sender == "global") == (terms.provenance == 3), path
