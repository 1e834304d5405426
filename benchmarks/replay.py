"""``moestream bench replay``: ``replay --direct`` throughput, the log trained by the one training loop.

Rows, on one simulator log (moestream's own schema, Parquet) replayed into the default model with Feast's
SQLite online store (and its offline history), as ``moestream replay LOG --direct`` runs it by default:

- **direct replay**: ``learner.replay_source.train_replay``: the log read as Arrow event tables on the read-ahead
  thread, joined there, trained by ``learner.loop``. Events/s from the first read to the last step.
- **anchor, per-event dicts**: the ingestion of a95311a's ``DirectTrainer``, rebuilt here on today's training
  loop so that only the ingestion differs: every event a Python dict, encoded to JSON and decoded again
  (``stream.events.decode_batch``), joined and trained in one thread. Goal: >= 1.5x. The same loop's other
  gains (threads, the offline history behind the push) help the anchor too, so this ratio understates the
  change against a95311a itself, which docs/learner.md measures on the same log.
- **reading alone**: the replay reader with no training (parse, order, validate): the ceiling the trainer
  can approach, and a KuaiRand-schema CSV of the same events read and trained, for the CSV parser's cost.
"""

from __future__ import annotations

import time
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow as pa
from rich.progress import Progress

from benchmarks.harness import Report, Row
from infra.config import load_config
from learner.config import WorkerConfig
from learner.intake import ExamplesSource
from learner.replay_source import train_replay
from learner.worker import compose
from stream.events import decode_batch, encode
from stream.joiner import LabelJoiner
from stream.logfile import write_log
from stream.replay import ReplayConfig, ReplaySource
from stream.simulator import Simulator, SimulatorConfig

GOAL_RATIO = 1.5
BATCH = 512


def _config(root: Path) -> WorkerConfig:
    """What ``moestream replay --direct`` runs with by default (W&B off: its start-up is not replay)."""
    return load_config(data={"paths": {"data_root": str(root), "run": "replay"}, "telemetry": {"mode": "disabled"},
                             "trainer": {"batch_size": BATCH}}).worker_config()


def direct_rate(log: Path, root: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result, stats = train_replay(_config(root), ReplayConfig(path=log, progress=False))
    return result.emitted / (time.perf_counter() - started), {**stats, "events": result.emitted}


def dict_path_rate(log: Path, root: Path) -> tuple[float, int]:
    """The anchor: a95311a's ``DirectTrainer.learn_events`` and ``finish``, on today's training loop."""
    config = _config(root)
    started = time.perf_counter()
    loop = compose(config, lambda restored: ExamplesSource(), checkpoints=False)
    joiner, buffer, position = LabelJoiner(config.joiner), [], 0

    def train(examples: pa.Table, final: bool) -> None:
        if examples.num_rows:
            buffer.append(examples)
        table = pa.concat_tables(buffer) if buffer else None
        while table is not None and (table.num_rows >= BATCH or (final and table.num_rows)):
            loop.step(table.slice(0, BATCH))
            table = table.slice(BATCH)
        buffer[:] = [table] if table is not None and table.num_rows else []

    for events in ReplaySource(ReplayConfig(path=log, progress=False)).batches():
        n = len(events)
        decoded = decode_batch([encode(e) for e in events], [0] * n, range(position, position + n))
        position += n
        joiner.add(decoded)
        train(joiner.emit(), final=False)
    train(joiner.flush(), final=True)
    loop.publish()
    loop.close()
    return position / (time.perf_counter() - started), loop.learner.examples


def read_rate(log: Path) -> float:
    started = time.perf_counter()
    n = sum(t.num_rows for t in ReplaySource(ReplayConfig(path=log, progress=False)).tables())
    return n / (time.perf_counter() - started)


def kuairand_csv(events: list[dict], path: Path) -> None:
    """The simulator's impressions as KuaiRand-1K view rows (one row per impression, its labels joined)."""
    import pandas as pd

    labels: dict[tuple, dict] = {}
    for e in events:
        if e["type"] == "feedback":
            labels.setdefault((e["request_id"], e["item_id"]), {}).update(e["labels"])
    rows = []
    for e in events:
        if e["type"] != "impression":
            continue
        got = labels.get((e["request_id"], e["item_id"]), {})
        rows.append({"user_id": e["user_id"], "video_id": e["item_id"], "date": 20220408, "hourmin": 1200,
                     "time_ms": e["ts_ms"], "is_click": got.get("click", 0), "is_like": got.get("like", 0),
                     "is_follow": got.get("follow", 0), "is_comment": got.get("comment", 0),
                     "is_forward": got.get("forward", 0), "is_hate": 0, "long_view": got.get("long_view", 0),
                     "play_time_ms": got.get("play_time", 0.0), "duration_ms": 30_000, "profile_stay_time": 0,
                     "comment_stay_time": 0, "is_profile_enter": 0, "is_rand": 0, "tab": 1})
    pd.DataFrame(rows).to_csv(path, index=False)


def run(quick: bool = False) -> Report:
    report = Report("replay")
    n_requests = 12_000 if quick else 60_000  # about 8 events per request
    with TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        root = Path(tmp)
        task = progress.add_task("replay benchmark", total=5)
        events = list(Simulator(SimulatorConfig(seed=11)).events(1_700_000_000_000, n_requests))
        log, csv = root / "log.parquet", root / "kuairand.csv"
        write_log(events, log)
        kuairand_csv(events, csv)
        progress.advance(task)
        anchor, anchor_examples = dict_path_rate(log, root / "anchor")
        progress.advance(task)
        rate, stats = direct_rate(log, root / "direct")
        progress.advance(task)
        ceiling = read_rate(log)
        progress.advance(task)
        csv_rate, csv_stats = direct_rate(csv, root / "csv")
        progress.advance(task)
    report.add(Row("replay --direct (Parquet log)", rate, "events/s", anchor="per-event dicts + JSON, same loop",
                   anchor_value=anchor, goal=f">= {GOAL_RATIO}x the dict path", met=rate >= GOAL_RATIO * anchor))
    report.add(Row("replay reader alone (no training)", ceiling, "events/s", anchor="replay --direct",
                   anchor_value=rate))
    report.add(Row("replay --direct (KuaiRand-schema CSV)", csv_rate, "events/s"))
    if stats["examples_trained"] != anchor_examples:
        report.notes.append(f"the two paths trained different numbers of examples: {stats['examples_trained']} "
                            f"vs {anchor_examples}")
    report.notes.append(f"{len(events):,} simulator events ({n_requests:,} requests), {stats['examples_trained']:,} "
                        f"examples trained in {stats['steps']} steps of {BATCH}; default model "
                        f"({stats.get('family', 'mmoe')}), Feast SQLite online store; the CSV holds the same "
                        f"impressions as {csv_stats['events']:,} KuaiRand events")
    return report


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["run"]
