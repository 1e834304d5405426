"""``bench quality``'s stream: one seed's simulator log, its examples in the trainer's order, and the oracle.

The simulator (``stream.simulator``) writes a moestream log (``stream.logfile.write_log``) while an
:class:`OracleRecorder` takes the true probability behind every label it draws. The log is then read and joined
exactly as ``learner.replay_source.ReplayIntake`` does (``stream.replay.ReplaySource`` tables, ``decoded_batch``,
``stream.joiner.LabelJoiner``), which gives the examples every trainer of the benchmark will see, in the order it
will see them, with their labels. The oracle's probabilities are attached to those examples by
``(request_id, item_id)`` here, after the fact: they live in the benchmark, never in the log, so no feature and
no model can read them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from stream.events import IMPRESSION, TASKS
from stream.joiner import JoinerConfig, LabelJoiner
from stream.logfile import decoded_batch, write_log
from stream.replay import ReplayConfig, ReplaySource
from stream.simulator import Simulator, SimulatorConfig

START_MS = 1_700_000_000_000


class OracleRecorder:
    """The simulator's oracle sink (``stream.simulator.OracleSink``): every impression's true probabilities."""

    def __init__(self) -> None:
        self._requests: list[str] = []
        self._items: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []

    def __call__(self, request_id: str, user: int, items: np.ndarray, probs: np.ndarray) -> None:
        self._requests.append(request_id)
        self._items.append(items)
        self._probs.append(probs.astype(np.float32))

    def table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(request_ids (N,), items (N,), probs (N, T))``, one row per impression in the order drawn."""
        if not self._requests:
            return np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, len(TASKS)), np.float32)
        sizes = [len(items) for items in self._items]
        return (np.repeat(np.array(self._requests, object), sizes), np.concatenate(self._items).astype(np.int64),
                np.concatenate(self._probs))


def example_index(request_ids: np.ndarray, items: np.ndarray) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([pd.Index(request_ids, dtype=object), pd.Index(items, dtype=np.int64)])


@dataclass(frozen=True)
class QualityStream:
    """One seed's log and its examples, in the trainer's order: labels and the oracle's probabilities."""

    seed: int
    log: Path
    request_ids: np.ndarray  # (N,) str
    items: np.ndarray  # (N,) int64
    users: np.ndarray  # (N,) int64
    ts_ms: np.ndarray  # (N,) int64, the impression's event time
    labels: np.ndarray  # (N, T) 0/1 float32, T = len(TASKS)
    oracle: np.ndarray  # (N, T) float32: the probabilities the labels were drawn with

    def __len__(self) -> int:
        return len(self.ts_ms)

    def positions(self, request_ids: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Each ``(request_id, item_id)``'s position among the examples (-1: not an example of this stream)."""
        return self._index.get_indexer(example_index(request_ids, items))

    @cached_property
    def _index(self) -> pd.MultiIndex:
        return example_index(self.request_ids, self.items)


def _counted(events: Iterator[dict], on_impressions: Callable[[int], None] | None, every: int = 10_000
             ) -> Iterator[dict]:
    """``events``, telling ``on_impressions`` how many impressions went by, every ``every`` and at the end."""
    seen = 0
    for event in events:
        if event["type"] == IMPRESSION:
            seen += 1
            if seen == every and on_impressions is not None:
                on_impressions(seen)
                seen = 0
        yield event
    if seen and on_impressions is not None:
        on_impressions(seen)


def joined_examples(log: Path, joiner: JoinerConfig) -> pa.Table:
    """The log's examples as the replay trainer gets them: read, decoded and joined as ``ReplayIntake`` does."""
    join, parts, position = LabelJoiner(joiner), [], 0
    for events in ReplaySource(ReplayConfig(path=log, progress=False)).tables():
        join.add(decoded_batch(events, position))
        position += events.num_rows
        parts.append(join.emit())
    parts.append(join.flush())
    return pa.concat_tables(parts)


def simulate(seed: int, n_requests: int, directory: Path, joiner: JoinerConfig = JoinerConfig(),
             on_impressions: Callable[[int], None] | None = None) -> QualityStream:
    """Draw ``n_requests`` requests of the default simulator seeded ``seed`` into ``directory/seed-<seed>.parquet``
    and join them with ``joiner`` (the trainer's)."""
    recorder = OracleRecorder()
    sim = Simulator(SimulatorConfig(seed=seed), oracle=recorder)
    log = directory / f"seed-{seed}.parquet"
    write_log(_counted(sim.events(START_MS, n_requests), on_impressions), log)
    examples = joined_examples(log, joiner)
    request_ids = np.array(examples["request_id"].to_pylist(), object)
    items = examples["item_id"].to_numpy().astype(np.int64)
    drawn_ids, drawn_items, probs = recorder.table()
    at = example_index(drawn_ids, drawn_items).get_indexer(example_index(request_ids, items))
    if (at < 0).any():
        raise RuntimeError(f"{int((at < 0).sum())} examples of seed {seed} have no oracle probabilities")
    return QualityStream(
        seed, log, request_ids, items, examples["user_id"].to_numpy().astype(np.int64),
        examples["ts_ms"].to_numpy().astype(np.int64),
        np.stack([examples[t].to_numpy().astype(np.float32) for t in TASKS], axis=1), probs[at],
    )


__all__ = ["START_MS", "OracleRecorder", "QualityStream", "joined_examples", "simulate"]
