"""A worker resumed from a checkpoint skips the events below the checkpoint's offsets that Kafka delivers again
(its committed offsets may be behind a checkpoint made durable just before a crash): the checkpoint holds them."""

from __future__ import annotations

import orjson

from stream.events import decode_batch
from stream.joined import _from
from stream.simulator import Simulator, SimulatorConfig

NOW_MS = 1_700_000_000_000


def test_events_below_the_checkpoint_s_offsets_are_left_out_per_partition() -> None:
    events = list(Simulator(SimulatorConfig(seed=1, max_delay_s=1.0)).events(NOW_MS, 40))
    n = len(events)
    partitions, offsets = [i % 3 for i in range(n)], [i // 3 for i in range(n)]
    decoded = decode_batch([orjson.dumps(e) for e in events], partitions, offsets, now_ms=NOW_MS)
    floor = {0: 7, 1: 0}  # partition 2: not in the checkpoint, read whole

    kept, skipped = _from(decoded, floor)

    for table in (kept.impressions, kept.feedback):
        for part, off in zip(table["partition"].to_pylist(), table["offset"].to_pylist()):
            assert off >= floor.get(part, 0)
    below = sum(1 for t in (decoded.impressions, decoded.feedback)
                for part, off in zip(t["partition"].to_pylist(), t["offset"].to_pylist()) if off < floor.get(part, 0))
    assert below > 0 and skipped == below
    assert kept.n_valid == decoded.n_valid - below
    assert kept.impressions.schema == decoded.impressions.schema and kept.feedback.schema == decoded.feedback.schema
