"""The ranking API's response bodies, written from a ranking's arrays.

A full response holds one object per candidate (``{"item_id", "score", "probabilities": {task: p}}``), the
shape ``serving.api.RankResponse`` documents. Built the obvious way, as a dict per candidate for orjson, it is
two dicts, a tuple and eight numbers of Python objects per candidate: at 1000 candidates that was the largest
part of a response's cost after scoring itself. :func:`full_response` writes the same JSON without them: orjson
formats each column of numbers at once from the arrays (as it does for a compact response), and one ``%``
formatting puts the numbers into a template of the objects. The numbers are the float32 values the model
computed, written as their shortest round-trip form (``0.46768957``, where a dict of Python floats gave the
float64 expansion ``0.467689573764801`` of the same value): the same values, a quarter fewer bytes.
:func:`reference_full_response` keeps the obvious way, which the tests compare it with.
"""

from __future__ import annotations

import numpy as np
import orjson

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


__all__ = ["compact_response", "full_response", "reference_full_response"]
