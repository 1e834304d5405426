"""Batch codecs of Feast's online formats against Feast's own serializers, and bad blobs."""

from __future__ import annotations

import numpy as np
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from hypothesis import given
from hypothesis import strategies as st

from features.codec import decode_float_lists, decode_int64_lists, encode_float_lists, entity_keys

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(INT64, max_size=20))
def test_entity_keys_are_feasts_serialized_keys(ids: list[int]) -> None:
    expected = [serialize_entity_key(EntityKeyProto(join_keys=["item_id"], entity_values=[ValueProto(int64_val=i)]),
                                     entity_key_serialization_version=3) + b"proj" for i in ids]
    assert entity_keys("item_id", np.array(ids, dtype=np.int64), b"proj") == expected


@given(st.lists(st.lists(st.floats(width=32), min_size=3, max_size=3), max_size=10))
def test_float_lists_encode_as_feast_values_and_decode_bit_for_bit(rows: list[list[float]]) -> None:
    matrix = np.array(rows, dtype=np.float32).reshape(len(rows), 3)
    blobs = encode_float_lists(matrix)
    assert blobs == [ValueProto(float_list_val=FloatList(val=row)).SerializeToString() for row in matrix.tolist()]
    decoded, found = decode_float_lists(blobs, 3)
    assert found.all() and decoded.tobytes() == matrix.tobytes()  # NaN payloads and -0.0 included


@given(st.lists(st.lists(st.floats(), min_size=4, max_size=4), max_size=10))
def test_double_lists_encode_as_feast_values_and_decode_bit_for_bit(rows: list[list[float]]) -> None:
    matrix = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
    blobs = encode_float_lists(matrix, "<f8")
    assert blobs == [ValueProto(double_list_val=DoubleList(val=row)).SerializeToString() for row in matrix.tolist()]
    decoded, found = decode_float_lists(blobs, 4, "<f8")
    assert found.all() and decoded.dtype == np.float64 and decoded.tobytes() == matrix.tobytes()
    floats = encode_float_lists(matrix.astype(np.float32)) if len(rows) else []  # a float list is not a double list
    assert not decode_float_lists(floats, 4, "<f8")[1].any()


def test_blobs_of_another_type_or_width_decode_as_missing() -> None:
    good = ValueProto(float_list_val=FloatList(val=[1.0, 2.0])).SerializeToString()
    wider = ValueProto(float_list_val=FloatList(val=[1.0, 2.0, 3.0])).SerializeToString()
    int64s = ValueProto(int64_list_val=Int64List(val=[2**62])).SerializeToString()
    doubles = ValueProto(double_list_val=DoubleList(val=[1.0])).SerializeToString()
    blobs = [good, None, wider, doubles, int64s, b"", good]
    decoded, found = decode_float_lists(blobs, 2)
    assert found.tolist() == [True, False, False, False, False, False, True]
    assert decoded[0].tolist() == [1.0, 2.0] and (decoded[~found] == 0).all()
    # a blob exactly as long as a 2-float list but not one
    impostor = ValueProto(double_list_val=DoubleList(val=[1.0])).SerializeToString().ljust(len(good), b"\0")
    assert len(impostor) == len(good) and not decode_float_lists([impostor], 2)[1][0]


def test_int64_lists_decode_with_missing_for_anything_else() -> None:
    lists = [ValueProto(int64_list_val=Int64List(val=[3, -1])).SerializeToString(), None,
             ValueProto(int64_list_val=Int64List(val=[3])).SerializeToString()]
    values, found = decode_int64_lists(lists, 2, missing=-9)
    assert found.tolist() == [True, False, False] and values.tolist() == [[3, -1], [-9, -9], [-9, -9]]
