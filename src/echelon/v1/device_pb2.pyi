from echelon.v1 import options_pb2 as _options_pb2
from echelon.v1 import secagg_pb2 as _secagg_pb2
from echelon.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BoundaryReference(_message.Message):
    __slots__ = ("version", "parameters")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    version: int
    parameters: _tensor_pb2.TensorPayload
    def __init__(self, version: _Optional[int] = ..., parameters: _Optional[_Union[_tensor_pb2.TensorPayload, _Mapping]] = ...) -> None: ...

class UpdateReady(_message.Message):
    __slots__ = ("base_version", "tokens", "train_loss", "local_round")
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ROUND_FIELD_NUMBER: _ClassVar[int]
    base_version: int
    tokens: int
    train_loss: float
    local_round: int
    def __init__(self, base_version: _Optional[int] = ..., tokens: _Optional[int] = ..., train_loss: _Optional[float] = ..., local_round: _Optional[int] = ...) -> None: ...

class AggregationRequest(_message.Message):
    __slots__ = ("round_id", "weight", "participants")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    weight: float
    participants: int
    def __init__(self, round_id: _Optional[int] = ..., weight: _Optional[float] = ..., participants: _Optional[int] = ...) -> None: ...

class PlainInput(_message.Message):
    __slots__ = ("round_id", "weighted_delta")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTED_DELTA_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    weighted_delta: _tensor_pb2.TensorPayload
    def __init__(self, round_id: _Optional[int] = ..., weighted_delta: _Optional[_Union[_tensor_pb2.TensorPayload, _Mapping]] = ...) -> None: ...

class UpdateDiscarded(_message.Message):
    __slots__ = ("round_id", "reason")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    reason: str
    def __init__(self, round_id: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class DeviceEnvelope(_message.Message):
    __slots__ = ("device_id", "reference", "update_ready", "aggregation_request", "plain_input", "discarded", "hello", "secagg", "goodbye")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_READY_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PLAIN_INPUT_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    reference: BoundaryReference
    update_ready: UpdateReady
    aggregation_request: AggregationRequest
    plain_input: PlainInput
    discarded: UpdateDiscarded
    hello: Hello
    secagg: _secagg_pb2.SecAggMessage
    goodbye: Goodbye
    def __init__(self, device_id: _Optional[str] = ..., reference: _Optional[_Union[BoundaryReference, _Mapping]] = ..., update_ready: _Optional[_Union[UpdateReady, _Mapping]] = ..., aggregation_request: _Optional[_Union[AggregationRequest, _Mapping]] = ..., plain_input: _Optional[_Union[PlainInput, _Mapping]] = ..., discarded: _Optional[_Union[UpdateDiscarded, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., secagg: _Optional[_Union[_secagg_pb2.SecAggMessage, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ...) -> None: ...
