"""Data-parallel learners: two worker processes over gloo on loopback against one process on the union batch.

Each worker is its own OS process (spawned), meeting through a TCP store this test hosts, as the driver
does in production. What must hold: the summed gradient is the single-process gradient of the union
batch, the load-balancing regulariser is the one of the union batch, and the weights stay identical,
also through a step where one worker has no data (a zero-weight step).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from features.definitions import FEATURE_COLUMNS
from learner.distributed import GroupConfig, GroupReducer, LocalReducer, host_store
from learner.models import load_balance_loss
from learner.config import LearnerConfig
from learner.loop import TrainingLoop
from learner.snapshots import SnapshotStore
from learner.worker import rank_partitions
from stream.events import EXAMPLE_SCHEMA, TASKS
from tests.conftest import free_port

CONFIG = LearnerConfig(
    family="smes",
    hparams={"n_experts": 6, "k_shared": 1, "k_private": 1, "expert_dims": (8,), "tower_dims": (4,), "lb_coef": 0.5},
    n_buckets=512,
    tables=None,  # the shared hashed table: a forward on raw ids is the training one (tests/learner/test_id_tables.py
    emb_dim=4,    # holds the per-field tables' group semantics)
    loss_weights={"click": 2.0, "like": 0.5},
)
SIZES = [(48, 80), (0, 64), (40, 16)]
"""Rows per step for (worker 0, worker 1): worker 0 has no data at step 1 (a zero-weight step)."""


class _Features:
    """In-memory stand-in for the online store: deterministic dense features per (user, item); keeps the
    latest row pushed for each user and item."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, np.ndarray]] = {"user_id": {}, "item_id": {}}

    def lookup(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        base = (user_ids[:, None] * 7 + item_ids[:, None] * 3 + np.arange(len(FEATURE_COLUMNS))) % 11
        return base.astype(np.float32)

    def push(self, users, items, before_commit=None) -> None:
        for frame, key in ((users, "user_id"), (items, "item_id")):
            values = frame.drop(columns=[key, "event_timestamp"]).to_numpy(np.float64)
            stamps = frame["event_timestamp"].astype("int64").to_numpy() // 1_000_000  # ms
            for entity, row, stamp in zip(frame[key].tolist(), values, stamps):
                self.rows[key][int(entity)] = np.append(row, stamp)
        if before_commit is not None:  # the rows are readable now (the store's contract)
            before_commit()

    def flush(self) -> None:
        return None

    def arrays(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, rows in self.rows.items():
            ids = sorted(rows)
            out[f"{prefix}.{key}.ids"] = torch.tensor(ids, dtype=torch.int64)
            out[f"{prefix}.{key}.rows"] = torch.from_numpy(np.array([rows[i] for i in ids]).reshape(len(ids), -1))
        return out


def _batch(step: int, rank: int, n: int) -> pa.Table:
    rng = np.random.default_rng(1000 * step + rank)
    labels = {t: (rng.random(n) < 0.3).astype(np.float32) for t in TASKS}
    labels["like"][: n // 3] = np.nan  # unlabelled for "like": masked out of that task only
    return pa.table(
        {
            "request_id": [f"r{step}.{rank}.{i}" for i in range(n)],
            "user_id": rng.integers(0, 50, n),
            "item_id": rng.integers(0, 80, n),
            "ts_ms": np.full(n, 1_000 + step, dtype=np.int64),
            **labels,
            "play_time": rng.random(n).astype(np.float32) * 1000,
            "partition": np.full(n, rank, dtype=np.int32),
            "offset": np.arange(n, dtype=np.int64),
            "is_correction": np.zeros(n, dtype=bool),
        },
        schema=EXAMPLE_SCHEMA,
    )


def _learner(tmp: Path, reducer, features: _Features | None = None) -> TrainingLoop:
    return TrainingLoop.local(CONFIG, features or _Features(), SnapshotStore(tmp / "snapshots"), reducer=reducer)


class _Recording(GroupReducer):
    """Keeps the first step's reduced gradients and regulariser for comparison."""

    grads: dict[str, torch.Tensor] | None = None
    regulariser: torch.Tensor | None = None

    def reduce_batch(self, task_counts, lb_stats):
        counts, summed = super().reduce_batch(task_counts, lb_stats)
        if self.regulariser is None and summed is not None:
            self.regulariser = load_balance_loss(*summed, CONFIG.hparams["n_experts"]).detach()
        return counts, summed

    def reduce_grads(self, parameters) -> None:
        parameters = list(parameters)
        super().reduce_grads(parameters)
        if self.grads is None:
            self.grads = {str(i): p.grad.detach().clone() for i, p in enumerate(parameters)}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    reducer = _Recording(GroupConfig("127.0.0.1", port, world_size=2, rank=rank, timeout_s=60), torch.device("cpu"))
    features = _Features()
    learner = _learner(Path(out), reducer, features)
    reducer.broadcast_parameters(learner.learner.model)
    for step, sizes in enumerate(SIZES):
        learner.step(_batch(step, rank, sizes[rank]))
    learner.features.wait()
    weights = {f"w.{k}": v.detach().contiguous() for k, v in learner.learner.model.state_dict().items()}
    grads = {f"g.{k}": v.contiguous() for k, v in reducer.grads.items()}
    save_file({**weights, **grads, **features.arrays("pushed"), "regulariser": reducer.regulariser.reshape(1)},
              f"{out}/rank{rank}.safetensors")
    reducer.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    store = host_store("127.0.0.1", port, world_size=2)
    mp.start_processes(_worker, args=(port, str(out)), nprocs=2, join=True, start_method="spawn")
    del store
    return load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))


def test_workers_hold_identical_weights_after_every_step(two_workers) -> None:
    first, second = two_workers
    weights = [k for k in first if k.startswith("w.")]
    assert weights
    for key in weights:
        assert torch.equal(first[key], second[key]), key


def test_summed_gradient_is_the_single_process_gradient_of_the_union_batch(two_workers, tmp_path) -> None:
    first, _ = two_workers
    reference = _learner(tmp_path, LocalReducer())
    params = list(reference.learner.model.parameters())
    union = pa.concat_tables([_batch(0, 0, SIZES[0][0]), _batch(0, 1, SIZES[0][1])])
    grads = {}
    step = reference.learner.optimizer.step
    reference.learner.optimizer.step = lambda: grads.update({str(i): p.grad.clone() for i, p in enumerate(params)})
    reference.step(union)
    reference.learner.optimizer.step = step
    assert grads.keys() == {k[2:] for k in first if k.startswith("g.")}
    for key, grad in grads.items():
        torch.testing.assert_close(first[f"g.{key}"], grad, rtol=1e-4, atol=1e-6)


def test_regulariser_is_the_one_of_the_union_batch(two_workers, tmp_path) -> None:
    first, second = two_workers
    model = _learner(tmp_path, LocalReducer()).learner.model
    union = pa.concat_tables([_batch(0, 0, SIZES[0][0]), _batch(0, 1, SIZES[0][1])])
    ids = {k: torch.from_numpy(np.asarray(union[k])) for k in ("user_id", "item_id")}
    dense = torch.from_numpy(_Features().lookup(np.asarray(union["user_id"]), np.asarray(union["item_id"])))
    with torch.no_grad():
        expected = load_balance_loss(*model(ids, dense).lb_stats, CONFIG.hparams["n_experts"])
    assert math.isfinite(expected.item()) and expected.item() > 0
    torch.testing.assert_close(first["regulariser"][0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second["regulariser"][0], expected, rtol=1e-5, atol=1e-6)


def test_k_distributed_steps_match_k_single_process_steps_on_the_unions(two_workers, tmp_path) -> None:
    first, _ = two_workers
    reference = _learner(tmp_path, LocalReducer())
    for step, (n0, n1) in enumerate(SIZES):
        reference.step(pa.concat_tables([_batch(step, 0, n0), _batch(step, 1, n1)]))
    for key, value in reference.learner.model.state_dict().items():
        torch.testing.assert_close(first[f"w.{key}"], value, rtol=1e-4, atol=1e-5)


def test_each_entity_is_pushed_by_its_owner_with_the_aggregates_of_the_union(two_workers, tmp_path) -> None:
    """Both workers' batches share users and items; each entity's aggregates are pushed by one worker only
    (``id mod 2``), and equal what one learner pushes training on the union batches, step by step."""
    features = _Features()
    reference = _learner(tmp_path, LocalReducer(), features)
    for step, (n0, n1) in enumerate(SIZES):
        reference.step(pa.concat_tables([_batch(step, 0, n0), _batch(step, 1, n1)]))
    reference.features.wait()
    expected = features.arrays("pushed")
    for key in ("user_id", "item_id"):
        ids = [worker[f"pushed.{key}.ids"] for worker in two_workers]
        for rank, owned in enumerate(ids):
            assert len(owned) and bool((owned % 2 == rank).all()), f"rank {rank} pushed a {key} it does not own"
        merged = torch.cat(ids)
        order = merged.argsort()
        assert torch.equal(merged[order], expected[f"pushed.{key}.ids"])  # every entity, exactly once
        rows = torch.cat([worker[f"pushed.{key}.rows"] for worker in two_workers])[order]
        torch.testing.assert_close(rows, expected[f"pushed.{key}.rows"], rtol=1e-6, atol=1e-6)


HOME = LearnerConfig(family="home", hparams={"n_experts": 2, "expert_dims": (8,), "tower_dims": (4,)},
                     n_buckets=512, emb_dim=4)
HOME_SIZES = [(24, 40), (1, 0), (0, 9), (30, 1)]
"""HoME (BatchNorm in every expert) with a one-row step, zero-weight steps on either side."""


def _home_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    reducer = GroupReducer(GroupConfig("127.0.0.1", port, world_size=2, rank=rank, timeout_s=60), torch.device("cpu"))
    learner = TrainingLoop.local(HOME, _Features(), SnapshotStore(Path(out) / f"snapshots{rank}"), reducer=reducer)
    reducer.broadcast_parameters(learner.learner.model)
    for step, sizes in enumerate(HOME_SIZES):
        learner.step(_batch(step, rank, sizes[rank]))
    save_file({k: v.detach().contiguous() for k, v in learner.learner.model.state_dict().items()},
              f"{out}/home{rank}.safetensors")
    reducer.close()


def test_batchnorm_statistics_stay_identical_across_workers(tmp_path) -> None:
    port = free_port()
    store = host_store("127.0.0.1", port, world_size=2)
    mp.start_processes(_home_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    del store
    first, second = (load_file(str(tmp_path / f"home{r}.safetensors")) for r in range(2))
    stats = [k for k in first if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats and first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    counts = {int(first[k]) for k in stats if k.endswith("num_batches_tracked")}
    assert counts == {3}  # steps 0 and 3 on both, the one-row step 1 leaves them, step 2 on worker 1 only
    assert any(not torch.equal(first[k], torch.zeros_like(first[k])) for k in stats if k.endswith("running_mean"))


def test_loss_weights_are_validated_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"learner.loss_weights names unknown task\(s\) \['clik'\]"):
        LearnerConfig(loss_weights={"clik": 1.0})
    with pytest.raises(ValueError, match=r"learner.loss_weights.like must be a finite number >= 0"):
        LearnerConfig(loss_weights={"like": -1.0})


def test_unlabelled_rows_and_loss_weights_shape_the_loss(tmp_path) -> None:
    """One worker: loss = Σ_t w_t · (mean over the rows labelled for t) + lb_coef · regulariser."""
    batch = _batch(0, 0, 30)
    model = _learner(tmp_path, LocalReducer()).learner.model  # same seed: the learner's weights before its step
    ids = {k: torch.from_numpy(np.asarray(batch[k])) for k in ("user_id", "item_id")}
    dense = torch.from_numpy(_Features().lookup(np.asarray(batch["user_id"]), np.asarray(batch["item_id"])))
    with torch.no_grad():
        out = model(ids, dense)
    expected = CONFIG.hparams["lb_coef"] * load_balance_loss(*out.lb_stats, CONFIG.hparams["n_experts"]).item()
    for task in TASKS:
        y = torch.from_numpy(np.asarray(batch[task], dtype=np.float32))
        keep = ~torch.isnan(y)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(out.logits[task][keep], y[keep])
        expected += CONFIG.loss_weights.get(task, 1.0) * bce.item()
    assert int((~np.isfinite(np.asarray(batch["like"], dtype=np.float32))).sum()) == 10

    result = _learner(tmp_path, LocalReducer()).step(batch)
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_id_collision_rate_counts_keys_that_share_a_bucket() -> None:
    """The worker reports how many of the ids it has seen share an embedding bucket with another id."""
    from learner.models import FeatureEncoder
    from learner.collisions import id_collisions

    encoder = FeatureEncoder(["user_id", "item_id"], n_dense=0, n_buckets=64, emb_dim=2)
    ids = {"user_id": np.arange(40), "item_id": np.arange(40)}
    report = id_collisions(encoder, ids)
    buckets = torch.cat([encoder.buckets({"user_id": torch.arange(40), "item_id": torch.arange(40)})[:, i]
                         for i in range(2)])
    _, counts = torch.unique(buckets, return_counts=True)
    assert report.n_keys == 80 and report.n_buckets == 64 and report.occupied == counts.numel()
    assert report.rate == pytest.approx(float(counts[counts > 1].sum()) / 80)
    assert 0 < report.rate < 1 and report.expected_rate == pytest.approx(1 - math.exp(-80 / 64))
    assert id_collisions(FeatureEncoder(["user_id"], 0, n_buckets=2**20), {"user_id": np.arange(100)}).rate == 0


def test_ranks_split_the_partitions_and_more_ranks_than_partitions_is_refused() -> None:
    shares = [rank_partitions(5, 2, r) for r in range(2)]
    assert shares == [(0, 2, 4), (1, 3)]
    with pytest.raises(ValueError, match="kafka.partitions"):
        rank_partitions(2, 3, 0)
