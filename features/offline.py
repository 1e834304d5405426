"""The offline half of a push: Parquet parts appended to each view's directory, compacted in levels.

Feast's file offline store appends by reading the view's whole Parquet file and writing it back, so a
push costs time in proportion to everything pushed before it (quadratic over a run). A ``FileSource`` may
as well name a directory, which Feast reads as one dataset; so each push writes its rows as one new part
file, in time proportional to the push. To keep the number of files small, every ``fanout`` parts of one
level are merged into one part of the next level (each row is rewritten once per level, so the cost stays
proportional to the rows pushed, and a run of ``n`` pushes leaves at most ``fanout`` files per level and
``log_fanout(n)`` levels).

A part is written under a hidden name (Parquet readers skip names starting with ``.``) and renamed into
place, so a reader never sees half a file. Each writer names its parts with a token of its own and merges
only those, so writers sharing a directory (several trainers) never merge each other's files. A reader that
lists the directory while a merge deletes its inputs can fail to open one: retry the read.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_PART = "schema.parquet"
"""An empty part holding the view's schema, so that Feast can read the schema before the first push."""


class OfflineLayoutError(ValueError):
    """A view's directory holds parts of another schema (written by an older version)."""


class OfflineLog:
    def __init__(self, root: Path, fanout: int = 32) -> None:
        if fanout < 2:
            raise ValueError(f"fanout must be at least 2, got {fanout}")
        self.root = Path(root)
        self.fanout = fanout
        self.writer = uuid.uuid4().hex[:12]
        self._parts: dict[str, list[list[Path]]] = {}  # view -> this writer's parts per level
        self._seq = 0

    def directory(self, view: str) -> Path:
        return self.root / view

    def ensure(self, view: str, schema: pa.Schema) -> None:
        """Create the view's directory with its schema part; adopt a file from the single-file layout."""
        directory = self.directory(view)
        directory.mkdir(parents=True, exist_ok=True)
        legacy = self.root / f"{view}.parquet"
        if legacy.is_file():  # what earlier versions appended to: keep its rows as a part
            os.replace(legacy, directory / f"legacy-{uuid.uuid4().hex[:12]}.parquet")
        if not (directory / SCHEMA_PART).exists():
            self._publish(schema.empty_table(), directory / SCHEMA_PART)
            return
        held = pq.read_schema(directory / SCHEMA_PART)
        if held.names != schema.names or not held.equals(schema, check_metadata=False):
            raise OfflineLayoutError(
                f"{directory} holds offline parts with columns {held.names}, this version writes {schema.names} "
                f"(the data directory was written by an older moestream): move {self.root.parent} away, or set "
                f"features.data_dir to another directory, to start a fresh feature store")

    def append(self, view: str, table: pa.Table) -> None:
        """Write ``table`` as a new part of ``view``, then merge a full level if this filled one."""
        if table.num_rows == 0:
            return
        if view not in self._parts:
            self.directory(view).mkdir(parents=True, exist_ok=True)
        levels = self._parts.setdefault(view, [[]])
        levels[0].append(self._write(view, 0, table))
        level = 0
        while len(levels[level]) >= self.fanout:
            merged = pa.concat_tables([pq.read_table(p) for p in levels[level]])
            if len(levels) == level + 1:
                levels.append([])
            levels[level + 1].append(self._write(view, level + 1, merged))
            for part in levels[level]:
                part.unlink()
            levels[level] = []
            level += 1

    def parts(self, view: str) -> list[Path]:
        """Every part file of ``view`` (all writers), the schema part included."""
        return sorted(self.directory(view).glob("*.parquet"))

    def _write(self, view: str, level: int, table: pa.Table) -> Path:
        self._seq += 1
        path = self.directory(view) / f"L{level}-{self.writer}-{self._seq:09d}.parquet"
        self._publish(table, path)
        return path

    @staticmethod
    def _publish(table: pa.Table, path: Path) -> None:
        hidden = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, hidden, use_dictionary=False)  # float lists do not repeat: a dictionary costs 2x
        os.replace(hidden, path)
