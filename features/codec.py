"""Feast's online-store byte formats, encoded and decoded a batch at a time.

Feast keeps each entity's row under its serialized entity key and each feature value as a serialized
``feast.types.Value`` protobuf; the format is part of Feast's public contract so that other software may
read and write Feast-compatible stores directly (feast-dev/feast ``docs/specs/online_store_format.md``).
Going through Feast's per-row conversion costs tens of microseconds a row; here a batch is one numpy pass:

- an ``int64`` entity key (serialization version 3) is a constant prefix followed by the id's 8
  little-endian bytes;
- a ``float_list_val`` (``double_list_val``) of fixed width ``W`` is a constant header followed by ``W``
  little-endian float32s (float64s).

Everything else (``int64_list_val``) is parsed with protobuf, once per distinct blob. The
constants come from Feast's own serializers, and ``tests/features/test_codec.py`` holds both paths together.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import features.feast_import  # noqa: F401 - before Feast itself: see that module
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

ENTITY_KEY_SERIALIZATION_VERSION = 3


@cache
def _key_prefix(join_key: str) -> bytes:
    one = serialize_entity_key(EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=1)]),
                               entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION)
    assert one.endswith((1).to_bytes(8, "little")), "Feast's int64 entity key layout changed"
    return one[:-8]


def entity_keys(join_key: str, ids: np.ndarray, suffix: bytes = b"") -> list[bytes]:
    """Feast's serialized entity key of each int64 id (plus ``suffix``: Redis appends the project)."""
    prefix = _key_prefix(join_key)
    raw = np.ascontiguousarray(ids, dtype="<i8").tobytes()
    return [prefix + raw[i : i + 8] + suffix for i in range(0, len(raw), 8)]


_LISTS = {"<f4": ("float_list_val", FloatList), "<f8": ("double_list_val", DoubleList)}


@cache
def _list_header(width: int, dtype: str = "<f4") -> bytes:
    kind, proto = _LISTS[dtype]
    blob = ValueProto(**{kind: proto(val=[0.0] * width)}).SerializeToString()
    return blob[: len(blob) - np.dtype(dtype).itemsize * width]


def encode_float_lists(matrix: np.ndarray, dtype: str = "<f4") -> list[bytes]:
    """One serialized ``Value(float_list_val=row)`` per row of an ``(N, W)`` matrix (``dtype="<f8"``:
    ``double_list_val``)."""
    matrix = np.ascontiguousarray(matrix, dtype=dtype)
    header, step = _list_header(matrix.shape[1], dtype), matrix.dtype.itemsize * matrix.shape[1]
    raw = matrix.tobytes()
    return [header + raw[i : i + step] for i in range(0, len(raw), step)]


def decode_float_lists(blobs: Sequence[bytes | None], width: int,
                       dtype: str = "<f4") -> tuple[np.ndarray, np.ndarray]:
    """``(N, width)`` rows of ``dtype`` and a mask of the blobs that held a ``width``-long list of that type
    (``"<f4"``: ``float_list_val``, ``"<f8"``: ``double_list_val``).

    A missing blob, or one of another type or length (a row from an older schema), is left out of the mask
    (its row is zeros) so that the caller falls back to defaults, never to garbage.
    """
    header = _list_header(width, dtype)
    size = len(header) + np.dtype(dtype).itemsize * width
    sized = np.fromiter((b is not None and len(b) == size for b in blobs), bool, len(blobs))
    out = np.zeros((len(blobs), width), np.dtype(dtype).newbyteorder("="))
    if sized.any():
        index = np.flatnonzero(sized)
        raw = np.frombuffer(b"".join([blobs[i] for i in index.tolist()]), np.uint8).reshape(len(index), size)
        ok = (raw[:, : len(header)] == np.frombuffer(header, np.uint8)).all(axis=1)
        out[index[ok]] = raw[ok, len(header) :].copy().view(dtype)
        sized[index[~ok]] = False
    return out, sized


def decode_int64_lists(blobs: Sequence[bytes | None], width: int, missing: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, width)`` rows of ``int64_list_val`` blobs and a mask of those that held ``width`` values."""
    out = np.full((len(blobs), width), missing, np.int64)
    found = np.zeros(len(blobs), bool)
    for i, blob in enumerate(blobs):
        if blob is not None:
            values = ValueProto.FromString(blob).int64_list_val.val
            if len(values) == width:
                out[i], found[i] = values, True
    return out, found
