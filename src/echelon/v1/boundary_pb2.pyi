from echelon.v1 import device_pb2 as _device_pb2
from echelon.v1 import options_pb2 as _options_pb2
from echelon.v1 import secagg_pb2 as _secagg_pb2
from echelon.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BoundaryStatus(_message.Message):
    __slots__ = ("middle_step", "drift", "update_norm", "tokens", "contributors", "train_loss", "tokens_total")
    MIDDLE_STEP_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    middle_step: int
    drift: float
    update_norm: float
    tokens: int
    contributors: int
    train_loss: float
    tokens_total: int
    def __init__(self, middle_step: _Optional[int] = ..., drift: _Optional[float] = ..., update_norm: _Optional[float] = ..., tokens: _Optional[int] = ..., contributors: _Optional[int] = ..., train_loss: _Optional[float] = ..., tokens_total: _Optional[int] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("outer_step", "fragment", "fragments", "final")
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    outer_step: int
    fragment: int
    fragments: int
    final: bool
    def __init__(self, outer_step: _Optional[int] = ..., fragment: _Optional[int] = ..., fragments: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class BoundaryDelta(_message.Message):
    __slots__ = ("outer_step", "tokens", "delta", "middle_step", "contributors")
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    MIDDLE_STEP_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    outer_step: int
    tokens: int
    delta: _tensor_pb2.TensorPayload
    middle_step: int
    contributors: int
    def __init__(self, outer_step: _Optional[int] = ..., tokens: _Optional[int] = ..., delta: _Optional[_Union[_tensor_pb2.TensorPayload, _Mapping]] = ..., middle_step: _Optional[int] = ..., contributors: _Optional[int] = ...) -> None: ...

class OuterAggregation(_message.Message):
    __slots__ = ("outer_step", "request", "secagg")
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    outer_step: int
    request: _device_pb2.AggregationRequest
    secagg: _secagg_pb2.SecAggMessage
    def __init__(self, outer_step: _Optional[int] = ..., request: _Optional[_Union[_device_pb2.AggregationRequest, _Mapping]] = ..., secagg: _Optional[_Union[_secagg_pb2.SecAggMessage, _Mapping]] = ...) -> None: ...

class GlobalReference(_message.Message):
    __slots__ = ("outer_step", "parameters", "final", "fragment", "fragments")
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    outer_step: int
    parameters: _tensor_pb2.TensorPayload
    final: bool
    fragment: int
    fragments: int
    def __init__(self, outer_step: _Optional[int] = ..., parameters: _Optional[_Union[_tensor_pb2.TensorPayload, _Mapping]] = ..., final: _Optional[bool] = ..., fragment: _Optional[int] = ..., fragments: _Optional[int] = ...) -> None: ...

class CadenceUpdate(_message.Message):
    __slots__ = ("interval",)
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    interval: int
    def __init__(self, interval: _Optional[int] = ...) -> None: ...

class AuditHead(_message.Message):
    __slots__ = ("seq", "hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hash: bytes
    def __init__(self, seq: _Optional[int] = ..., hash: _Optional[bytes] = ...) -> None: ...

class CrossBoundaryEnvelope(_message.Message):
    __slots__ = ("boundary_id", "audit_head", "status", "sync_request", "boundary_delta", "global_reference", "cadence", "outer_aggregation")
    BOUNDARY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SYNC_REQUEST_FIELD_NUMBER: _ClassVar[int]
    BOUNDARY_DELTA_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CADENCE_FIELD_NUMBER: _ClassVar[int]
    OUTER_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    boundary_id: str
    audit_head: AuditHead
    status: BoundaryStatus
    sync_request: SyncRequest
    boundary_delta: BoundaryDelta
    global_reference: GlobalReference
    cadence: CadenceUpdate
    outer_aggregation: OuterAggregation
    def __init__(self, boundary_id: _Optional[str] = ..., audit_head: _Optional[_Union[AuditHead, _Mapping]] = ..., status: _Optional[_Union[BoundaryStatus, _Mapping]] = ..., sync_request: _Optional[_Union[SyncRequest, _Mapping]] = ..., boundary_delta: _Optional[_Union[BoundaryDelta, _Mapping]] = ..., global_reference: _Optional[_Union[GlobalReference, _Mapping]] = ..., cadence: _Optional[_Union[CadenceUpdate, _Mapping]] = ..., outer_aggregation: _Optional[_Union[OuterAggregation, _Mapping]] = ...) -> None: ...
