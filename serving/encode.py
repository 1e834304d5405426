"""The ranking API's response bodies, written from a ranking's arrays (HTTP's JSON, gRPC's ``RankResponse``).

A full response holds one object per candidate (``{"item_id", "score", "probabilities": {task: p}}``), the
shape ``serving.api.RankResponse`` documents. Built the obvious way, as a dict per candidate for orjson, it is
two dicts, a tuple and eight numbers of Python objects per candidate: at 1000 candidates that was the largest
part of a response's cost after scoring itself. :func:`full_response` writes the same JSON without them: orjson
formats each column of numbers at once from the arrays (as it does for a compact response), and one ``%``
formatting puts the numbers into a template of the objects. The numbers are the float32 values the model
computed, written as their shortest round-trip form (``0.46768957``, where a dict of Python floats gave the
float64 expansion ``0.467689573764801`` of the same value): the same values, a quarter fewer bytes.
:func:`reference_full_response` keeps the obvious way, which the tests compare it with.

gRPC's ``RankResponse`` is likewise one ``ScoredItem`` message per candidate: :func:`rank_message` writes the items'
protobuf wire bytes from the arrays (varints and little-endian floats, laid out in a byte matrix) and has protobuf
parse them once, in C, where adding a message per candidate from Python took most of the response's cost;
:func:`reference_rank_message` keeps that way for the tests.
"""

from __future__ import annotations

import numpy as np
import orjson

from serving.proto import ranking_pb2 as pb
from serving.ranker import Ranking

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def _key(name: str) -> bytes:
    """``name`` as a JSON object key, safe inside a ``%`` template."""
    return orjson.dumps(name).replace(b"%", b"%%")


def _numbers(values: np.ndarray) -> list[bytes]:
    """Each number of ``values`` (1-d, or 2-d read row by row) as JSON, one ``bytes`` each (``null`` where not finite,
    as orjson writes it)."""
    text = orjson.dumps(np.ascontiguousarray(values).reshape(-1), option=_NUMPY)  # b"[a,b,...]"
    return text[1:-1].split(b",") if len(text) > 2 else []


def _head(ranking: Ranking, replica: str, pid: int) -> dict:
    return {"model_version": ranking.version, "family": ranking.family, "replica": replica, "pid": pid,
            "batch": ranking.batch}


def full_response(ranking: Ranking, replica: str, pid: int) -> bytes:
    """The candidates best first, each with its fused score and per-task probabilities (``RankResponse``)."""
    order = ranking.order
    n, n_tasks = len(order), len(ranking.tasks)
    head = orjson.dumps(_head(ranking, replica, pid))[:-1]  # b'{"model_version":...,"batch":N'
    if not n:
        return head + b',"items":[]}'
    one = (b'{"item_id":%s,"score":%s,"probabilities":{'
           + b",".join(_key(task) + b":%s" for task in ranking.tasks) + b"}}")
    template = b"%s,\"items\":[" + b",".join([one] * n) + b"]}"
    columns = np.empty((n, 1 + n_tasks), np.float32)  # (n, 1 + T): the score, then each task's probability
    columns[:, 0] = ranking.scores[order]
    columns[:, 1:] = ranking.probabilities[order]
    numbers = _numbers(columns)
    values: list[bytes | None] = [None] * (n * (2 + n_tasks))
    values[0::2 + n_tasks] = _numbers(ranking.items[order])
    for j in range(1 + n_tasks):
        values[1 + j::2 + n_tasks] = numbers[j::1 + n_tasks]
    return template % (head, *values)


def reference_full_response(ranking: Ranking, replica: str, pid: int) -> bytes:
    """:func:`full_response` the obvious way: a dict per candidate for orjson (numbers as float64)."""
    order = ranking.order
    items = [{"item_id": i, "score": s, "probabilities": dict(zip(ranking.tasks, p))}
             for i, s, p in zip(ranking.items[order].tolist(), ranking.scores[order].tolist(),
                                ranking.probabilities[order].tolist())]
    return orjson.dumps({**_head(ranking, replica, pid), "items": items})


def compact_response(ranking: Ranking, replica: str, pid: int) -> bytes:
    """The candidates best first and their fused scores only, as two parallel lists (``CompactRankResponse``)."""
    order = ranking.order
    return orjson.dumps({**_head(ranking, replica, pid), "item_ids": ranking.items[order],
                         "scores": ranking.scores[order]}, option=_NUMPY)


_VARINT_BYTES = 10
_SHIFTS = np.arange(_VARINT_BYTES, dtype=np.uint64) * np.uint64(7)
_LIMITS = np.uint64(1) << _SHIFTS[1:]  # 2^7, 2^14, ..., 2^63: a value at or above the k-th takes k + 2 bytes
_CONTINUED = np.arange(_VARINT_BYTES)


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf's varint of each int64 (a negative one as its 64-bit two's complement, 10 bytes): the bytes,
    ``(n, 10)`` uint8 with only the first ``length`` of each row meant, and ``length`` ``(n,)``."""
    v = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    length = np.searchsorted(_LIMITS, v, side="right") + 1  # (n,)
    groups = ((v[:, None] >> _SHIFTS) & np.uint64(0x7F)).astype(np.uint8)  # (n, 10), 7 bits each, low first
    groups[_CONTINUED < (length[:, None] - 1)] |= np.uint8(0x80)  # every byte but a varint's last says "more"
    return groups, length


def _varint(value: int) -> bytes:
    """The varint of one value in 0 .. 2^63."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def rank_message(ranking: Ranking, replica: str, compact: bool) -> pb.RankResponse:
    """The candidates best first as gRPC's ``RankResponse``: each ``ScoredItem`` with its id and fused score, and
    unless ``compact`` its per-task probabilities (packed, in ``tasks`` order)."""
    order = ranking.order
    n, n_tasks = len(order), len(ranking.tasks)
    head = pb.RankResponse(model_version=ranking.version, family=ranking.family, replica=replica,
                           batch=ranking.batch, tasks=ranking.tasks).SerializeToString()
    if not n:
        return pb.RankResponse.FromString(head)
    ids, id_bytes = _varints(ranking.items[order])
    scores = np.ascontiguousarray(ranking.scores[order], dtype="<f4").view(np.uint8).reshape(n, 4)
    with_probabilities = not compact and n_tasks > 0
    tail = b""  # field 3's tag and length, the same for every item
    if with_probabilities:
        tail = b"\x1a" + _varint(4 * n_tasks)
    body = 1 + id_bytes + 5 + (len(tail) + 4 * n_tasks if with_probabilities else 0)  # (n,) each ScoredItem's size
    sizes, size_bytes = (body.astype(np.uint8)[:, None], np.ones(n, np.int64)) if body.max() < 0x80 else _varints(body)
    # One row of bytes per item: field 6's tag, the item's size, field 1 (id), field 2 (score), field 3; each part at a
    # fixed column, as wide as its longest, with a mask of the bytes each row means.
    parts = [(np.full((n, 1), 0x32, np.uint8), np.ones(n, np.int64)),
             (sizes[:, : int(size_bytes.max())], size_bytes),
             (np.full((n, 1), 0x08, np.uint8), np.ones(n, np.int64)),
             (ids[:, : int(id_bytes.max())], id_bytes),
             (np.full((n, 1), 0x15, np.uint8), np.ones(n, np.int64)),
             (scores, np.full(n, 4))]
    if with_probabilities:
        probabilities = np.ascontiguousarray(ranking.probabilities[order], dtype="<f4").view(np.uint8)  # (n, 4T)
        parts += [(np.tile(np.frombuffer(tail, np.uint8), (n, 1)), np.full(n, len(tail))),
                  (probabilities, np.full(n, 4 * n_tasks))]
    rows = np.concatenate([block for block, _ in parts], axis=1)  # (n, W)
    meant = np.concatenate([np.arange(block.shape[1]) < used[:, None] for block, used in parts], axis=1)
    return pb.RankResponse.FromString(head + rows[meant].tobytes())


def reference_rank_message(ranking: Ranking, replica: str, compact: bool) -> pb.RankResponse:
    """:func:`rank_message` the obvious way: a ``ScoredItem`` added from Python per candidate."""
    order = ranking.order
    response = pb.RankResponse(model_version=ranking.version, family=ranking.family, replica=replica,
                               batch=ranking.batch, tasks=ranking.tasks)
    add = response.items.add
    ids, scores = ranking.items[order].tolist(), ranking.scores[order].tolist()
    if compact:
        for item, score in zip(ids, scores):
            add(item_id=item, score=score)
    else:
        for item, score, probabilities in zip(ids, scores, ranking.probabilities[order].tolist()):
            add(item_id=item, score=score, probabilities=probabilities)
    return response


__all__ = ["compact_response", "full_response", "rank_message", "reference_full_response", "reference_rank_message"]
