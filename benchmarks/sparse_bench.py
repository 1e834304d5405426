"""Embedding step cost against table size: sparse row-wise Adagrad (``RowwiseTable``) and the alternatives.

    python -m benchmarks.sparse_bench [--quick] [--device cuda]

One step is forward + backward + update of a ``fields``-field lookup: ``batch`` rows of ``fields`` IDs each,
drawn log-uniformly (Zipf-like, P(k) ~ 1/k) from one table of ``n_rows`` rows that every field reads, scored
by the factorisation machine's pairwise interaction against coin-flip labels. There is no dense network:
what is timed is the embedding path alone. Contenders:

- ``rowwise``: ``learner.models.sparse.RowwiseTable`` (our sparse row-wise Adagrad);
- ``dense_adam``: ``nn.Embedding`` + fused Adam, what the learner does today: every row, every step. Skipped
  (None) from the first size where one step takes over ``dense_cap_s``, since larger tables only get slower;
- ``sparse_adam``: ``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam``;
- ``sparse_adagrad``: ``nn.Embedding(sparse=True)`` + ``torch.optim.Adagrad`` (element-wise state);
- ``fbgemm_rowwise``: FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` with ``EXACT_ROWWISE_ADAGRAD``, only
  where ``fbgemm_gpu`` loads beside the running torch (it does not beside torch 2.15: docs/embeddings.md).

Contenders run one after the other (the largest tables do not fit in memory together), each for a few warm-up
steps and then ``steps`` timed steps or ``budget_s`` seconds; ``measure`` returns the median (or minimum) ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from learner.models.sparse import RowwiseTable

LR = 0.05
SIZES = (10**5, 10**6, 10**7)


def zipf_rows(n_rows: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Rows in [1, n_rows], P(k) ~ log((k+1)/k) ~ 1/k: a few hot IDs and a long tail, like a feed's users."""
    return (float(n_rows) ** torch.rand(shape, generator=generator, dtype=torch.float64)).long().clamp_(1, n_rows)


def score(emb: Tensor, labels: Tensor) -> Tensor:
    """FM pairwise interaction of the fields' embeddings ``(B, F, dim)``, BCE against ``labels (B,)``."""
    logits = 0.5 * (emb.sum(dim=1).square() - emb.square().sum(dim=1)).sum(dim=-1)  # (B,)
    return F.binary_cross_entropy_with_logits(logits, labels)


def _rowwise(n_rows: int, dim: int, device: torch.device) -> Callable[[Tensor, Tensor], None]:
    table = RowwiseTable(n_rows, dim, lr=LR).to(device)

    def step(rows: Tensor, labels: Tensor) -> None:
        score(table.lookup(rows), labels).backward()
        table.apply_gradients()

    return step


def _embedding(n_rows: int, dim: int, device: torch.device, optimizer: str) -> Callable[[Tensor, Tensor], None]:
    emb = nn.Embedding(n_rows + 1, dim, sparse=optimizer != "dense_adam", device=device)
    nn.init.normal_(emb.weight, std=dim**-0.5)
    if optimizer == "dense_adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(emb.parameters(), lr=1e-3, fused=True)
    elif optimizer == "sparse_adam":
        opt = torch.optim.SparseAdam(list(emb.parameters()), lr=1e-3)
    else:
        opt = torch.optim.Adagrad(emb.parameters(), lr=LR)

    def step(rows: Tensor, labels: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        score(emb(rows), labels).backward()
        opt.step()

    return step


def _fbgemm(n_rows: int, dim: int, device: torch.device) -> Callable[[Tensor, Tensor], None] | None:
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType  # type: ignore[import-not-found]
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode  # type: ignore[import-not-found]
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (  # type: ignore[import-not-found]
            ComputeDevice,
            EmbeddingLocation,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except (ImportError, OSError):  # not installed, or its .so does not load beside this torch
        return None
    on_gpu = device.type == "cuda"
    location, compute = (
        (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if on_gpu else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    )
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n_rows + 1, dim, location, compute)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=LR,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
    )

    def step(rows: Tensor, labels: Tensor) -> None:
        flat = rows.reshape(-1)
        offsets = torch.arange(flat.numel() + 1, device=flat.device)  # bags of one ID: a plain lookup
        emb = tbe(flat, offsets).view(*rows.shape, dim)  # (B, F, dim)
        score(emb, labels).backward()  # FBGEMM fuses the row-wise update into backward

    return step


def _time(
    step: Callable[[Tensor, Tensor], None], batches: list[tuple[Tensor, Tensor]], device: torch.device,
    *, warmup: int, steps: int, budget_s: float, cap_s: float | None,
) -> list[float]:
    """ms of each timed step; empty when the first step already exceeds ``cap_s``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        t0 = time.perf_counter()
        step(*batches[i % len(batches)])
        sync()
        # the first step also allocates the optimizer's state: the cap reads the second
        if cap_s is not None and i >= 1 and time.perf_counter() - t0 > cap_s:
            return []
    samples: list[float] = []
    start = time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        step(*batches[(warmup + i) % len(batches)])
        sync()
        samples.append(1e3 * (time.perf_counter() - t0))
        if time.perf_counter() - start > budget_s and len(samples) >= 3:
            break
    return samples


def measure(
    n_rows: int, batch: int = 1024, fields: int = 2, dim: int = 32, *, device: str = "cpu", steps: int = 50,
    budget_s: float = 8.0, dense_cap_s: float = 5.0, stat: str = "median", skip: tuple[str, ...] = (),
) -> dict[str, float | None]:
    """ms per step of each contender at ``n_rows`` rows: its ``stat`` ("median" or "min") over the timed
    steps; None where a contender was skipped (dense over ``dense_cap_s`` a step, fbgemm not loadable, ``skip``)."""
    pick = min if stat == "min" else statistics.median
    runs = samples(n_rows, batch, fields, dim, device=device, steps=steps, budget_s=budget_s,
                   dense_cap_s=dense_cap_s, skip=skip)
    return {name: pick(ms) if ms else None for name, ms in runs.items()}


def samples(
    n_rows: int, batch: int = 1024, fields: int = 2, dim: int = 32, *, device: str = "cpu", steps: int = 50,
    budget_s: float = 8.0, dense_cap_s: float = 5.0, skip: tuple[str, ...] = (),
) -> dict[str, list[float]]:
    """Every timed step's ms, per contender (empty where skipped): what ``measure`` summarises."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (zipf_rows(n_rows, (batch, fields), g).to(dev), torch.randint(0, 2, (batch,), generator=g).float().to(dev))
        for _ in range(16)
    ]
    builders: dict[str, Callable[[], Callable[[Tensor, Tensor], None] | None]] = {
        "rowwise": lambda: _rowwise(n_rows, dim, dev),
        "dense_adam": lambda: _embedding(n_rows, dim, dev, "dense_adam"),
        "sparse_adam": lambda: _embedding(n_rows, dim, dev, "sparse_adam"),
        "sparse_adagrad": lambda: _embedding(n_rows, dim, dev, "sparse_adagrad"),
        "fbgemm_rowwise": lambda: _fbgemm(n_rows, dim, dev),
    }
    out: dict[str, list[float]] = {}
    for name, build in builders.items():
        step = None if name in skip else build()
        cap = dense_cap_s if name == "dense_adam" else None
        out[name] = [] if step is None else _time(step, batches, dev, warmup=3, steps=steps, budget_s=budget_s,
                                                  cap_s=cap)
        del step  # free this contender's table before the next one builds its own
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10^5 and 10^6 rows only, fewer steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SIZES[:2] if args.quick else SIZES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    names = ("rowwise", "dense_adam", "sparse_adam", "sparse_adagrad", "fbgemm_rowwise")
    print("| rows | " + " | ".join(f"{n} ms (median / min)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    skip: tuple[str, ...] = ()
    for n in sizes:
        runs = samples(n, device=args.device, steps=20 if args.quick else 50, skip=skip)
        if not runs["dense_adam"]:  # over the cap here: a larger table is slower still
            skip = ("dense_adam",)
        cells = [f"{statistics.median(runs[k]):.2f} / {min(runs[k]):.2f}" if runs[k] else "skipped" for k in names]
        print(f"| 10^{len(str(n)) - 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
