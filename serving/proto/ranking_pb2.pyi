from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankRequest(_message.Message):
    __slots__ = ("user_id", "candidates", "task_weights", "compact")
    class TaskWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    TASK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    user_id: int
    candidates: _containers.RepeatedScalarFieldContainer[int]
    task_weights: _containers.ScalarMap[str, float]
    compact: bool
    def __init__(self, user_id: _Optional[int] = ..., candidates: _Optional[_Iterable[int]] = ..., task_weights: _Optional[_Mapping[str, float]] = ..., compact: _Optional[bool] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "probabilities")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    item_id: int
    score: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, item_id: _Optional[int] = ..., score: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("model_version", "family", "replica", "batch", "tasks", "items")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model_version: int
    family: str
    replica: str
    batch: int
    tasks: _containers.RepeatedScalarFieldContainer[str]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    def __init__(self, model_version: _Optional[int] = ..., family: _Optional[str] = ..., replica: _Optional[str] = ..., batch: _Optional[int] = ..., tasks: _Optional[_Iterable[str]] = ..., items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ok", "model_version", "swaps", "rejected_versions", "batches", "pid", "replica")
    OK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    model_version: int
    swaps: int
    rejected_versions: _containers.RepeatedScalarFieldContainer[int]
    batches: int
    pid: int
    replica: str
    def __init__(self, ok: _Optional[bool] = ..., model_version: _Optional[int] = ..., swaps: _Optional[int] = ..., rejected_versions: _Optional[_Iterable[int]] = ..., batches: _Optional[int] = ..., pid: _Optional[int] = ..., replica: _Optional[str] = ...) -> None: ...
