from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Provenance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROVENANCE_UNSPECIFIED: _ClassVar[Provenance]
    DEVICE: _ClassVar[Provenance]
    BOUNDARY_AGGREGATE: _ClassVar[Provenance]
    GLOBAL: _ClassVar[Provenance]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    UINT32: _ClassVar[DType]
    UINT64: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
PROVENANCE_UNSPECIFIED: Provenance
DEVICE: Provenance
BOUNDARY_AGGREGATE: Provenance
GLOBAL: Provenance
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
UINT32: DType
UINT64: DType
BFLOAT16: DType

class TensorPayload(_message.Message):
    __slots__ = ("provenance", "contributors", "dtype", "numel", "data", "offset", "total_numel")
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NUMEL_FIELD_NUMBER: _ClassVar[int]
    provenance: Provenance
    contributors: int
    dtype: DType
    numel: int
    data: bytes
    offset: int
    total_numel: int
    def __init__(self, provenance: _Optional[_Union[Provenance, str]] = ..., contributors: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., numel: _Optional[int] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_numel: _Optional[int] = ...) -> None: ...
