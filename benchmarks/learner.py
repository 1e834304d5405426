"""``moestream bench learner``: sustained throughput of the whole trainer beside the bare model's ceiling.

Pipeline rows: a backlog of simulator events in a real Kafka topic is read by 1 or 2 trainer actors
under Ray (``infra.pipeline.start_trainers``): consume, parse, join, Feast online lookup and push,
forward, backward (and, with 2 workers, the gradient all-reduce), Adam, checkpoints. Events/s is
Kafka messages (impressions and feedback) consumed per second while training keeps up, measured
between the first trained step and the last message consumed; examples/s is joined impressions
trained per second over the same span.

Anchor (the ceiling): the same model, batch, loss and optimizer stepping on tensors built
beforehand, in this process: no Kafka, no Feast, no joiner. The pipeline's examples/s over it is
the fraction of the ceiling the plumbing leaves (reported without a goal: kafka-python's parsing alone takes
about half of what two cores can consume; the goal is events/s). Without ``KAFKA_BOOTSTRAP_SERVERS`` a local
broker is started for the run and stopped after it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from rich.progress import Progress

from benchmarks.harness import Report, Row
from benchmarks.stream import _recent_events, broker
from features.definitions import FEATURE_COLUMNS, ID_FIELDS
from learner.models import MultiTaskRanker, loss_terms
from learner.allocator import retain_freed_memory
from learner.config import LearnerConfig
from learner.step import build_optimizer
from stream.events import TASKS, encode
from stream.kafka_io import EventSink, ensure_topics

BATCH = 1024
GOAL_EVENTS_PER_S = 20_000
FAMILIES = {
    "MMoE-8": ("mmoe", {"n_experts": 8}),
    "HoME": ("home", {}),
}


def bare_examples_per_s(family: str, hparams: dict, steps: int) -> float:
    """The ceiling: forward + loss + backward + Adam and the row-wise table update on pre-built tensors of the
    trainer's shape."""
    config = LearnerConfig(family=family, hparams=hparams)
    model = MultiTaskRanker(family, tasks=list(TASKS), id_fields=list(ID_FIELDS), n_dense=len(FEATURE_COLUMNS),
                            n_buckets=config.n_buckets, emb_dim=config.emb_dim, **hparams)
    optimizer = build_optimizer(model.parameters(), config.lr)  # the trainer's own
    gen = torch.Generator().manual_seed(0)
    ids = {f: torch.randint(0, 10**6, (BATCH,), generator=gen) for f in ID_FIELDS}
    dense = torch.rand(BATCH, len(FEATURE_COLUMNS), generator=gen) * 10
    labels = {t: (torch.rand(BATCH, generator=gen) < 0.2).float() for t in TASKS}

    def step() -> None:
        total, _ = loss_terms(model(ids, dense), labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()  # Adam: the dense network
        for table in model.encoder.row_tables().values():
            table.apply_gradients()  # row-wise Adagrad: the batch's rows

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - start)


def pipeline_rates(bootstrap: str, family: str, hparams: dict, workers: int, events: list[bytes],
                   root: Path, timeout_s: float = 600) -> dict:
    """Events/s and examples/s of ``workers`` trainer actors draining ``events`` from a fresh topic."""
    import ray

    from features.store import OnlineFeatures
    from infra.pipeline import RunLayout, start_trainers, worker_config

    topic = f"bench.learner.{uuid.uuid4().hex[:8]}"
    config = worker_config(RunLayout(root / topic), bootstrap=bootstrap, topic=topic, family=family,
                           window_ms=2_000, snapshot_every_steps=10**6, batch_size=BATCH, wandb_mode="disabled")
    cadence = replace(config.learner.cadence, checkpoint_every_steps=50)
    config = replace(config, learner=replace(config.learner, hparams=hparams, cadence=cadence),
                     kafka=replace(config.kafka, max_batch=4096))
    ensure_topics(config.kafka)
    OnlineFeatures(config.features).apply()
    sink = EventSink(config.kafka)
    for value in events:
        sink.send_raw(value, key=None)
    sink.flush()
    sink.close()
    group = start_trainers(config, workers, max_restarts=0)
    n, t0, consumed0, trained0 = len(events), None, 0, 0
    deadline = time.monotonic() + timeout_s
    while True:
        stats = group.stats()
        now = time.perf_counter()
        consumed, trained = sum(s["consumed"] for s in stats), sum(s["examples_trained"] for s in stats)
        if t0 is None and trained > 0:
            t0, consumed0, trained0 = now, consumed, trained
        if consumed >= n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{workers} worker(s) consumed {consumed} of {n} in {timeout_s}s")
        time.sleep(0.25)  # a benchmark's sampling period, not a wait for a condition
    elapsed = now - (t0 or now)
    finals = group.stop()
    for actor in group.actors:
        ray.kill(actor)
    return {
        "events_per_s": (consumed - consumed0) / elapsed if elapsed > 0 else float("nan"),
        "examples_per_s": (trained - trained0) / elapsed if elapsed > 0 else float("nan"),
        "collisions": finals[0]["id_collision_rate"], "id_keys": finals[0]["id_keys"],
        "buckets": finals[0]["id_buckets"],
    }


def run(quick: bool = False) -> Report:
    from infra.runtime import init_ray

    report = Report("learner")
    retain_freed_memory()  # as the trainer process does (learner.worker): the ceiling is measured alike
    n_requests = 6_000 if quick else 30_000  # about 8 events per request
    families = {"MMoE-8": FAMILIES["MMoE-8"]} if quick else FAMILIES
    worker_counts = (1,) if quick else (1, 2)
    events = [encode(e) for e in _recent_events(n_requests)]
    with broker() as bootstrap, TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        task = progress.add_task("learner benchmark", total=len(families) * (1 + len(worker_counts)))
        init_ray(quiet=True)
        for label, (family, hparams) in families.items():
            ceiling = bare_examples_per_s(family, hparams, steps=10 if quick else 40)
            progress.advance(task)
            report.add(Row(f"{label}: bare model training (ceiling)", ceiling, "examples/s",
                           anchor="bare model", anchor_value=ceiling))
            measured = None
            for workers in worker_counts:
                try:
                    rates = pipeline_rates(bootstrap, family, hparams, workers, events, Path(tmp))
                except Exception as exc:  # a failed configuration is reported, the others still run
                    report.notes.append(f"{label}, {workers} workers: failed: {type(exc).__name__}: {str(exc)[:200]}")
                    progress.advance(task)
                    continue
                progress.advance(task)
                measured, one = rates, workers == 1
                report.add(Row(f"{label}, {workers} worker(s): Kafka + Feast + trainer", rates["events_per_s"],
                               "events/s", goal=f">= {GOAL_EVENTS_PER_S:,} events/s" if one else None,
                               met=rates["events_per_s"] >= GOAL_EVENTS_PER_S if one else None))
                report.add(Row(f"{label}, {workers} worker(s): examples trained", rates["examples_per_s"],
                               "examples/s", anchor="bare model", anchor_value=ceiling))
            if measured is not None:  # every configuration may have failed (each says so in a note)
                report.notes.append(
                    f"{label}: hashed ids, {measured['id_keys']:,} (field, id) keys seen by worker 0 in "
                    f"{measured['buckets']:,} buckets: collision rate {measured['collisions']:.2%}"
                )
    report.notes.append(f"{len(events):,} simulator events ({n_requests:,} requests) per run, batch {BATCH}, "
                        f"4 partitions; events/s counts impressions and feedback, examples/s joined impressions")
    return report


if __name__ == "__main__":
    run(quick=True).print()


__all__ = ["bare_examples_per_s", "pipeline_rates", "run"]
