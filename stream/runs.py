"""Sorted runs of events on disk and their k-way merge: the external sort behind replay of unsorted logs.

A run is one chunk of events sorted by (ts_ms, seq), spilled as Arrow IPC; :func:`merge_runs` merges runs a
batch at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from stream.logfile import sort_events

MIN_MERGE_BATCH = 1_024


class _Head:
    """The buffered front of one sorted run."""

    __slots__ = ("rest", "table", "ts", "seq")

    def __init__(self, batches: Iterable[pa.RecordBatch | pa.Table]) -> None:
        self.rest = iter(batches)

    def fill(self) -> bool:
        for batch in self.rest:
            if batch.num_rows:
                self.table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
                self.ts = self.table["ts_ms"].to_numpy()
                self.seq = self.table["seq"].to_numpy()
                return True
        return False

    def first(self) -> tuple[int, int]:
        return int(self.ts[0]), int(self.seq[0])

    def last(self) -> tuple[int, int]:
        return int(self.ts[-1]), int(self.seq[-1])

    def take_through(self, key: tuple[int, int]) -> pa.Table:
        """Remove and return the buffered rows at or before ``key``."""
        n = _count_through(self.ts, self.seq, key)
        part = self.table.slice(0, n)
        self.table, self.ts, self.seq = self.table.slice(n), self.ts[n:], self.seq[n:]
        return part


def _count_through(ts: np.ndarray, seq: np.ndarray, key: tuple[int, int]) -> int:
    """How many rows of a (ts, seq)-sorted run have a key <= ``key``."""
    lo, hi = np.searchsorted(ts, key[0], "left"), np.searchsorted(ts, key[0], "right")
    return int(lo + np.searchsorted(seq[lo:hi], key[1], "right"))


def merge_runs(runs: Iterable[Iterable[pa.RecordBatch | pa.Table]]) -> Iterator[pa.Table]:
    """K-way merge of (ts_ms, seq)-sorted runs, a batch at a time.

    Each round takes the smallest last key buffered by any run (the frontier): every buffered row at or
    before it precedes every row not yet read, because each run's unread rows come after its buffered ones.
    Those rows are cut from each buffer, concatenated and sorted as one table. A round empties at least one
    buffer, so there are at most as many rounds as batches, and no Python loop touches single events.
    """
    heads = [h for h in map(_Head, runs) if h.fill()]
    while heads:
        frontier = min(h.last() for h in heads)
        # Runs that cover disjoint spans of time (a file sorted but for local disorder) mostly have nothing
        # at or before the frontier: a tuple comparison skips them.
        parts = [h.take_through(frontier) for h in heads if h.first() <= frontier]
        heads = [h for h in heads if len(h.ts) or h.fill()]
        yield parts[0] if len(parts) == 1 else sort_events(pa.concat_tables(parts))



def write_run(run: pa.Table, path: Path, batch_rows: int) -> None:
    # Arrow IPC, not Parquet: a run is written once and read once, and IPC with LZ4 writes ~5x and reads ~8x
    # faster than Parquet at about the same size (measured on KuaiRand-shaped events).
    options = ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4") else None)
    with ipc.new_file(path, run.schema, options=options) as writer:
        writer.write_table(run, max_chunksize=batch_rows)


def read_run(path: Path) -> Iterator[pa.RecordBatch]:
    """A run's record batches, one at a time (the file is memory-mapped, not loaded)."""
    with pa.memory_map(str(path)) as source:
        reader = ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


__all__ = ["MIN_MERGE_BATCH", "merge_runs", "read_run", "write_run"]
