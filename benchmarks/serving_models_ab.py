"""What serving the learner's model costs beside the model ``bench serving`` served before (``python -m
benchmarks.serving_models_ab``).

Until 2026-12-06 the grid of ``bench serving`` served the learner's family over one hashed table of ``n_buckets`` rows
without the wide part, where the learner's defaults train collisionless per-field tables and the wide part. This
deploys both side by side in one Ray instance (HAProxy ingress, ``REPLICAS`` replicas each, default
``ServingConfig``) over the same Feast store, and sends each the same request bodies in alternating rounds, the order
turned every round, so that a busy neighbour hits both alike. Rows: the learner's model, anchored on the hashed one
(p50, p99, requests/s per cell). docs/serving.md has the figures.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

from benchmarks.harness import Report, Row
from benchmarks.http_load import Sample, closed_loop
from benchmarks.serving import MODES, REPLICAS, TRAFFIC, _pct, bodies, prepare, rounds_main, serve_on_free_port

CELLS = ((1000, 8), (100, 8))
HASHED = "one hashed table, no wide part"


def publish_hashed(root: Path) -> Path:
    """A snapshot of the model the grid served before: the learner's family and hparams over one hashed table."""
    from features.definitions import FEATURE_COLUMNS, ID_FIELDS
    from learner.config import LearnerConfig
    from learner.models import MultiTaskRanker
    from learner.snapshots import SnapshotStore

    learner = LearnerConfig()
    model = MultiTaskRanker(learner.family, tasks=list(learner.tasks), id_fields=list(ID_FIELDS),
                            n_dense=len(FEATURE_COLUMNS), n_buckets=learner.n_buckets, emb_dim=learner.emb_dim,
                            **dict(learner.hparams))
    model.init_output_bias(learner.base_rates)
    SnapshotStore(root).publish(model.state_dict(), {"family": learner.family, "model_config": model.config})
    return root


def measure(root: Path, rounds: int, seconds: float, warmup_s: float, n_events: int = TRAFFIC,
            cells: tuple[tuple[int, int], ...] = CELLS) -> dict[tuple[int, int], dict[str, list[Sample]]]:
    """Each cell's samples per model (``hashed``, ``learner``), ``rounds`` each. Ray is started (with HAProxy) unless
    an instance is running already, which is then used as it is and left running."""
    from ray import serve

    from serving.app import build_app
    from serving.config import ServingConfig

    features, learner_store = prepare(root, n_events=n_events)
    stores = {"hashed": publish_hashed(root / "hashed"), "learner": learner_store}
    with serve_on_free_port(MODES["haproxy"], 2 * REPLICAS) as port:
        serve.run_many([serve.RunTarget(build_app(store, features, ServingConfig(num_replicas=REPLICAS)), name=name,
                                        route_prefix=f"/{name}") for name, store in stores.items()])
        out = {}
        for n, c in cells:
            payloads = bodies(n, 256, seed=n)
            samples: dict[str, list[Sample]] = {name: [] for name in stores}
            for r in range(rounds):
                for name in (list(stores) if r % 2 == 0 else list(stores)[::-1]):
                    url = f"http://127.0.0.1:{port}/{name}/v1/rank"
                    samples[name].append(asyncio.run(closed_loop(url, payloads, c, seconds, warmup_s)))
            out[(n, c)] = samples
        return out


def add_rows(report: Report, cells: dict[tuple[int, int], dict[str, list[Sample]]]) -> None:
    for (n, c), samples in cells.items():
        label = f"{n} candidates, concurrency {c}, the learner's model"
        hashed, learner = samples["hashed"], samples["learner"]
        for q in (50, 99):
            report.add(Row(f"{label}: p{q}", _pct(learner, q), "ms", anchor=HASHED, anchor_value=_pct(hashed, q)))
        report.add(Row(f"{label}: throughput", statistics.median(s.rate for s in learner), "req/s", anchor=HASHED,
                       anchor_value=statistics.median(s.rate for s in hashed)))
        errors = sum(s.errors for side in samples.values() for s in side)
        if errors:
            report.notes.append(f"{n} candidates, concurrency {c}: {errors} failed requests")


def run(rounds: int = 4, seconds: float = 5.0) -> Report:
    report = Report("serving models A/B")
    with tempfile.TemporaryDirectory() as tmp:
        add_rows(report, measure(Path(tmp), rounds, seconds, warmup_s=1.0))
    report.notes.append(f"HAProxy ingress, {REPLICAS} replicas per model, default ServingConfig; {rounds} rounds of "
                        f"{seconds:g} s per model and cell, alternating, the order turned each round")
    return report


def main(argv: list[str] | None = None) -> None:
    rounds_main(__doc__.split("\n\n")[0], run, argv)


if __name__ == "__main__":
    main()


__all__ = ["measure", "publish_hashed", "run"]
