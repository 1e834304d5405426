"""Arrays copied beside their owner's writes: the copy is the arrays of the moment it was taken.

    snapshot = RowSnapshot((weight, sum_sq), kept=torch.zeros(n, dtype=torch.bool), empty_like=torch.empty_like)
    ...                                        # the owner, before it writes rows: snapshot.before_write(weight, rows)
    weight_then, sum_sq_then = snapshot.copy()  # on another thread, while the owner goes on writing
    for start, (weight_rows, sum_sq_rows) in snapshot.stream():  # or chunk by chunk, without a copy of the whole
        ...

The arrays share their first dimension (rows). The copy runs in chunks of ``chunk_rows``; before the owner writes
rows the copy has not reached yet, it calls :meth:`RowSnapshot.before_write`, which keeps those rows' values (once
each), and the copy puts them back as it passes them. Taking a snapshot costs the mask of kept rows; the owner pays for
the rows it writes while the copy runs, not for the arrays. The owner must call ``before_write`` before every write
to the arrays, from the moment the snapshot is taken until it is ``done``; an owner that replaces its arrays (a
table that grows) leaves the snapshot's arrays unchanged and need not call it for the new ones.

Why it is correct: a row's first write after the snapshot either comes after the copy passed it (``copied`` is
past the row: the copy holds the old value) or keeps the old value first (under the lock, so the copy cannot pass
the row in between); the kept values overwrite whatever the copy read of rows written meanwhile.

Indexing only (``a[rows]``, ``out[start:end] = a[start:end]``, ``out[rows] = values``), so numpy arrays (the ID
maps) and torch tensors on any device (the embedding tables) use it alike.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

CHUNK_ROWS = 1 << 18
"""Rows copied at a time (32 MB of a table of dim 32)."""


class RowSnapshot:
    """``arrays`` as they are now, copied by :meth:`copy` (once) on any thread while their owner keeps writing.

    ``kept``: a zeroed boolean mask as long as the arrays (a numpy array or a tensor on their device);
    ``empty_like``: allocates the copy of one array (``numpy.empty_like`` or ``torch.empty_like``)."""

    def __init__(self, arrays: Sequence[Any], kept: Any, empty_like: Callable[[Any], Any],
                 chunk_rows: int | None = None, owner: Any = None) -> None:
        self.sources = tuple(arrays)
        """The arrays of that moment."""
        self._owner = self.sources[0] if owner is None else owner
        """The array ``before_write`` is told about: the first, or another of the owner's (snapshots of each of a
        table's arrays apart, each streamed whole in turn)."""
        self.copied = 0
        """Rows copied so far: a write below needs nothing kept."""
        self.done = False
        self._kept = kept
        self._rows = len(kept)
        self._empty_like = empty_like
        self._chunk_rows = chunk_rows or CHUNK_ROWS
        self._undo: list[tuple[Any, list[Any]]] = []
        self._lock = threading.Lock()

    def before_write(self, array: Any, rows: Any) -> None:
        """``rows`` (distinct) of ``array`` are about to be written: keep the values of those the copy has not
        reached and that were not kept already. An ``array`` other than the snapshot's owner array of that moment
        is another moment's (the owner replaced its arrays): nothing to keep."""
        if array is not self._owner:
            return
        with self._lock:
            if self.done:
                return
            rows = rows[(rows >= self.copied) & (rows < self._rows)]
            rows = rows[~self._kept[rows]]
            if len(rows):
                self._kept[rows] = True
                self._undo.append((rows, [source[rows] for source in self.sources]))

    def copy(self, progress: Callable[[int], None] | None = None) -> tuple[Any, ...]:
        """The arrays as they were when the snapshot was taken. ``progress``: called with the rows copied so far after
        each chunk."""
        out = tuple(self._empty_like(source) for source in self.sources)
        for _ in self.stream(progress, into=out):
            pass
        return out

    def stream(self, progress: Callable[[int], None] | None = None,
               into: tuple[Any, ...] | None = None) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """The arrays as they were when the snapshot was taken, a chunk of rows at a time: ``(start, chunks)``, each
        chunk a copy of rows ``start:start + len(chunk)`` of one array, in order; a consumer that writes each chunk
        out and drops it never holds a copy of the whole (``learner.checkpoint``). ``into``: arrays shaped like the
        sources that the chunks are copied into (and are views of). ``progress``: called with the rows copied so far
        after each chunk. A stream left before its end releases the snapshot."""
        try:
            for start in range(0, self._rows, self._chunk_rows):
                end = min(self._rows, start + self._chunk_rows)
                if into is None:
                    chunks = tuple(self._empty_like(source[start:end]) for source in self.sources)
                else:
                    chunks = tuple(target[start:end] for target in into)
                for chunk, source in zip(chunks, self.sources):
                    chunk[:] = source[start:end]
                with self._lock:  # from here on the owner keeps no row below ``end``: every one it kept is listed
                    self.copied = end
                    kept = list(self._undo)
                    if end == self._rows:
                        self.done, self._undo = True, []
                for rows, values in kept:  # rows written since the snapshot: their old values
                    inside = (rows >= start) & (rows < end)
                    if inside.any():
                        for chunk, value in zip(chunks, values):
                            chunk[rows[inside] - start] = value[inside]
                if progress is not None:
                    progress(end)
                yield start, chunks
        finally:
            self.release()

    def release(self) -> None:
        """No copy will be made (or it was): the owner's writes stop keeping rows for it."""
        with self._lock:
            self.done = True
            self._undo = []


__all__ = ["CHUNK_ROWS", "RowSnapshot"]
