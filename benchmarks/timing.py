"""Fair timing on a shared CPU: contenders alternate in one process, each round times every contender.

A busy neighbour or a frequency change then hits all contenders alike, and the median over rounds
ignores the odd round that one of them lost to a context switch. Also here: the GEMM peak every
GFLOP/s figure is read against, and whether this CPU does bf16 at all.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import Progress, TaskID
from torch import Tensor

from benchmarks.peers import Contender


@dataclass
class TrainingRun:
    """A contender with its optimiser and a few fixed batches it cycles through."""

    contender: Contender
    batches: Sequence[tuple[Tensor, Tensor]]
    autocast: torch.dtype | None = None
    lr: float = 1e-3
    fused_adam: bool = False
    """torch's default Adam (per-tensor, as the peers' trainers build it) or the fused one our learner uses."""
    samples: list[float] = field(default_factory=list)  # examples/s, one per timed round
    _next: int = 0

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.contender.model.parameters(), lr=self.lr, fused=self.fused_adam or None)
        self.contender.model.train()

    @property
    def name(self) -> str:
        return self.contender.name

    def step(self) -> None:
        """One forward + backward + Adam step on the next batch."""
        x, y = self.batches[self._next % len(self.batches)]
        self._next += 1
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.autocast):
            loss = self.contender.loss(x, y)
        loss.backward()
        self.optimizer.step()

    def median(self) -> float:
        return statistics.median(self.samples)


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 (or other) CPU autocast, or nothing for ``None``."""
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()


def random_batches(n_inputs: int, n_tasks: int, batch: int, count: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Gaussian inputs and coin-flip labels: throughput does not depend on what is learned."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, n_inputs, generator=g), torch.randint(0, 2, (batch, n_tasks), generator=g).float())
        for _ in range(count)
    ]


def interleave(
    runs: Sequence[TrainingRun],
    *,
    rounds: int,
    steps: int | Sequence[int],
    warmup: int | Sequence[int],
    progress: Progress | None = None,
    task: TaskID | None = None,
) -> None:
    """Warm every run up, then ``rounds`` times time ``steps`` steps of each in turn (A, B, C, A, B, C,
    ...), appending examples/s to each run's ``samples``. ``steps`` and ``warmup`` may differ per run
    (one sequence entry per run) when one step of a contender is many of another's. Advances ``task``
    once per warm-up and once per timed block."""
    steps = [steps] * len(runs) if isinstance(steps, int) else list(steps)
    warmup = [warmup] * len(runs) if isinstance(warmup, int) else list(warmup)
    for run, n in zip(runs, warmup):
        for _ in range(n):
            run.step()
        _advance(progress, task)
    for _ in range(rounds):
        for run, n in zip(runs, steps):
            batch = run.batches[0][0].shape[0]
            start = time.perf_counter()
            for _ in range(n):
                run.step()
            run.samples.append(batch * n / (time.perf_counter() - start))
            _advance(progress, task)


def _advance(progress: Progress | None, task: TaskID | None) -> None:
    if progress is not None and task is not None:
        progress.advance(task)


def gemm_peak(dtype: torch.dtype, max_n: int = 2048, repeats: int = 5, budget_s: float = 3.0) -> tuple[float, int]:
    """Achieved GFLOP/s of a square ``torch.mm``, best of ``repeats`` (a peak, so best, not median),
    and the side ``n`` it was measured at. ``n`` is ``max_n`` unless the dtype is so slow here (bf16
    without AVX512-BF16 runs at a fraction of a GFLOP/s) that ``repeats`` GEMMs would not fit in
    ``budget_s``; then the largest power of two from 256 up that fits."""
    n = 256
    probe = _mm_seconds(n, dtype)
    while n < max_n and probe * ((2 * n) / 256) ** 3 * repeats <= budget_s:
        n *= 2
    best = min(_mm_seconds(n, dtype) for _ in range(repeats))
    return 2 * n**3 / best / 1e9, n


def expert_gemm_seconds(n_experts: int, d_in: int, dims: Sequence[int], batch: int, repeats: int = 15) -> float:
    """Seconds of the GEMMs an MLP expert bank cannot avoid in one training step, by any implementation:
    per layer and expert the forward ``(B, d_in) x (d_in, d_out)``, the weight gradient ``(d_in, B) x (B,
    d_out)``, and from the second layer on the input gradient ``(B, d_out) x (d_out, d_in)`` (the first
    layer reads data, which needs none). Timed both as batched GEMMs over the experts (our layout) and as
    one GEMM per expert (``nn.Linear``'s, the peers' layout); the faster one's median over ``repeats``. No
    bias, activation, gate, tower or optimiser: a step that runs these GEMMs can take no less."""
    g = torch.Generator().manual_seed(batch)
    sizes = [d_in, *dims]
    layers = []
    for depth, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        x = torch.randn(batch, a, generator=g) if depth == 0 else torch.randn(n_experts, batch, a, generator=g)
        layers.append((x, torch.randn(n_experts, a, b, generator=g), torch.randn(n_experts, batch, b, generator=g)))

    def batched() -> None:
        for depth, (x, w, grad) in enumerate(layers):
            xs = x.expand(n_experts, *x.shape) if depth == 0 else x
            torch.bmm(xs, w)
            torch.bmm(xs.transpose(1, 2), grad)
            if depth:
                torch.bmm(grad, w.transpose(1, 2))

    def per_expert() -> None:
        for depth, (x, w, grad) in enumerate(layers):
            for e in range(n_experts):
                xe = x if depth == 0 else x[e]
                torch.mm(xe, w[e])
                torch.mm(xe.t(), grad[e])
                if depth:
                    torch.mm(grad[e], w[e].t())

    def median_seconds(run: Callable[[], None]) -> float:
        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return min(median_seconds(batched), median_seconds(per_expert))


def _mm_seconds(n: int, dtype: torch.dtype) -> float:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: first call pays allocation and kernel selection
    start = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - start


@dataclass(frozen=True)
class Bf16Support:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), and what we saw."""

    native: bool
    flags: tuple[str, ...]  # the bf16-relevant cpuinfo flags present
    mkldnn_bf16: bool  # oneDNN's own view (it also says yes where it merely emulates with AVX512)

    def describe(self) -> str:
        flags = ", ".join(self.flags) or "none of avx512_bf16 / amx_bf16 / amx_tile"
        return f"native bf16: {'yes' if self.native else 'no'} (cpu flags: {flags}; oneDNN bf16: {self.mkldnn_bf16})"


def bf16_support(cpuinfo: Path = Path("/proc/cpuinfo")) -> Bf16Support:
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = tuple(sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"}))
    try:
        mkldnn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn = False
    return Bf16Support(native=bool({"avx512_bf16", "amx_bf16"} & flags), flags=found, mkldnn_bf16=mkldnn)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
