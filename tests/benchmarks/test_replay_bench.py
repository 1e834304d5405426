"""``bench replay``: its anchor (a95311a's per-event dict path, rebuilt on today's loop) trains exactly what the
direct replay trains, so the two rates compare the same work."""

from __future__ import annotations

from pathlib import Path

from benchmarks.replay import dict_path_rate, direct_rate, kuairand_csv
from stream.logfile import write_log
from stream.simulator import Simulator, SimulatorConfig


def test_the_anchor_and_the_direct_replay_train_the_same_examples(tmp_path: Path) -> None:
    events = list(Simulator(SimulatorConfig(seed=3, max_delay_s=1.0)).events(1_700_000_000_000, 300))
    log, csv = tmp_path / "log.parquet", tmp_path / "kuairand.csv"
    write_log(events, log)
    kuairand_csv(events, csv)
    impressions = sum(e["type"] == "impression" for e in events)

    anchor_rate, anchor_examples = dict_path_rate(log, tmp_path / "anchor")
    rate, stats = direct_rate(log, tmp_path / "direct")
    csv_rate, csv_stats = direct_rate(csv, tmp_path / "csv")

    assert anchor_examples == stats["examples_trained"] == csv_stats["examples_trained"] == impressions
    assert stats["events"] == len(events) and csv_stats["events"] == 2 * impressions  # a view: impression + feedback
    assert min(anchor_rate, rate, csv_rate) > 0
