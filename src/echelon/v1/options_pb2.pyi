from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class FlowClass(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOW_CLASS_UNSPECIFIED: _ClassVar[FlowClass]
    AGGREGATE: _ClassVar[FlowClass]
    CONTROL: _ClassVar[FlowClass]
    TELEMETRY: _ClassVar[FlowClass]
    AUDIT: _ClassVar[FlowClass]
    DEVICE_LOCAL: _ClassVar[FlowClass]
    SECURE_AGGREGATION: _ClassVar[FlowClass]
FLOW_CLASS_UNSPECIFIED: FlowClass
AGGREGATE: FlowClass
CONTROL: FlowClass
TELEMETRY: FlowClass
AUDIT: FlowClass
DEVICE_LOCAL: FlowClass
SECURE_AGGREGATION: FlowClass
FLOW_CLASS_FIELD_NUMBER: _ClassVar[int]
flow_class: _descriptor.FieldDescriptor
MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
max_bytes: _descriptor.FieldDescriptor
MAX_COUNT_FIELD_NUMBER: _ClassVar[int]
max_count: _descriptor.FieldDescriptor
