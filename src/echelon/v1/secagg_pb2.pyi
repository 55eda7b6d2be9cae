from echelon.v1 import options_pb2 as _options_pb2
from echelon.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggAdvertiseKeys(_message.Message):
    __slots__ = ("cipher_public_key", "mask_public_key", "seed_commitment", "certificate", "signature")
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    cipher_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    certificate: bytes
    signature: bytes
    def __init__(self, cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggNeighbourKeys(_message.Message):
    __slots__ = ("index", "cipher_public_key", "mask_public_key", "seed_commitment", "certificate", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    cipher_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    certificate: bytes
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggRoster(_message.Message):
    __slots__ = ("index", "threshold", "degree", "bits", "neighbours")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    index: int
    threshold: int
    degree: int
    bits: int
    neighbours: _containers.RepeatedCompositeFieldContainer[SecAggNeighbourKeys]
    def __init__(self, index: _Optional[int] = ..., threshold: _Optional[int] = ..., degree: _Optional[int] = ..., bits: _Optional[int] = ..., neighbours: _Optional[_Iterable[_Union[SecAggNeighbourKeys, _Mapping]]] = ...) -> None: ...

class SecAggEncryptedShare(_message.Message):
    __slots__ = ("index", "ciphertext")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    index: int
    ciphertext: bytes
    def __init__(self, index: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class SecAggShareKeys(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggEncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggForwardedShares(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[SecAggEncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[SecAggEncryptedShare, _Mapping]]] = ...) -> None: ...

class SecAggMaskedInput(_message.Message):
    __slots__ = ("masked",)
    MASKED_FIELD_NUMBER: _ClassVar[int]
    masked: _tensor_pb2.TensorPayload
    def __init__(self, masked: _Optional[_Union[_tensor_pb2.TensorPayload, _Mapping]] = ...) -> None: ...

class SecAggConsistencyRequest(_message.Message):
    __slots__ = ("survivors",)
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, survivors: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggConsistencyResponse(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class SecAggSurvivorSignature(_message.Message):
    __slots__ = ("index", "certificate", "signature")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    index: int
    certificate: bytes
    signature: bytes
    def __init__(self, index: _Optional[int] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("dropped", "survivors", "signatures")
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    survivors: _containers.RepeatedScalarFieldContainer[int]
    signatures: _containers.RepeatedCompositeFieldContainer[SecAggSurvivorSignature]
    def __init__(self, dropped: _Optional[_Iterable[int]] = ..., survivors: _Optional[_Iterable[int]] = ..., signatures: _Optional[_Iterable[_Union[SecAggSurvivorSignature, _Mapping]]] = ...) -> None: ...

class SecAggShare(_message.Message):
    __slots__ = ("owner", "value")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    owner: int
    value: bytes
    def __init__(self, owner: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskResponse(_message.Message):
    __slots__ = ("seed_shares", "key_shares")
    SEED_SHARES_FIELD_NUMBER: _ClassVar[int]
    KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    seed_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    key_shares: _containers.RepeatedCompositeFieldContainer[SecAggShare]
    def __init__(self, seed_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ..., key_shares: _Optional[_Iterable[_Union[SecAggShare, _Mapping]]] = ...) -> None: ...

class SecAggMessage(_message.Message):
    __slots__ = ("round_id", "advertise_keys", "roster", "share_keys", "forwarded_shares", "masked_input", "unmask_request", "unmask_response", "consistency_request", "consistency_response")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    UNMASK_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_REQUEST_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    advertise_keys: SecAggAdvertiseKeys
    roster: SecAggRoster
    share_keys: SecAggShareKeys
    forwarded_shares: SecAggForwardedShares
    masked_input: SecAggMaskedInput
    unmask_request: SecAggUnmaskRequest
    unmask_response: SecAggUnmaskResponse
    consistency_request: SecAggConsistencyRequest
    consistency_response: SecAggConsistencyResponse
    def __init__(self, round_id: _Optional[int] = ..., advertise_keys: _Optional[_Union[SecAggAdvertiseKeys, _Mapping]] = ..., roster: _Optional[_Union[SecAggRoster, _Mapping]] = ..., share_keys: _Optional[_Union[SecAggShareKeys, _Mapping]] = ..., forwarded_shares: _Optional[_Union[SecAggForwardedShares, _Mapping]] = ..., masked_input: _Optional[_Union[SecAggMaskedInput, _Mapping]] = ..., unmask_request: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ..., unmask_response: _Optional[_Union[SecAggUnmaskResponse, _Mapping]] = ..., consistency_request: _Optional[_Union[SecAggConsistencyRequest, _Mapping]] = ..., consistency_response: _Optional[_Union[SecAggConsistencyResponse, _Mapping]] = ...) -> None: ...
