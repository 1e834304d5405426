"""A seeded simulator of short-video feed traffic: impressions now, feedback a little later.

Users and items have latent vectors, users an engagement level and items a quality. Each behaviour has its own view of the user-item affinity (a shared
component plus a task-specific one, so tasks are correlated but not identical, which is what multi-task
models exploit), and a bias calibrated at start-up so the label rates match a short-video feed: click
~35%, long view ~20%, like ~2%, comment / follow / forward well under 0.5%.

Drift, each with a knob: item popularity cycles with a per-item phase; new items arrive at a steady rate;
user interests take a small random walk. Everything is driven by one ``numpy`` generator, so the same seed
gives the same stream.

The oracle: ``Simulator(config, oracle=sink)`` hands ``sink`` the true per-task probabilities behind every
request's labels, ``(request_id, user, items (k,), probs (k, T))``, as they are drawn (``benchmarks.quality``
scores them as the best any model could do). They go to the sink only, never into an event, and recording them
draws nothing: the same seed gives the same events with a sink or without.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from stream.events import PLAY_TIME, TASKS, TYPICAL_POSITIVE_RATES, feedback, impression


@dataclass(frozen=True)
class SimulatorConfig:
    seed: int = 0
    n_users: int = 5_000
    n_items: int = 20_000
    dim: int = 8
    items_per_request: int = 4
    target_rates: tuple[float, ...] = tuple(TYPICAL_POSITIVE_RATES[t] for t in TASKS)
    """Mean positive rate per task in ``TASKS`` order."""
    popularity_period_s: float = 600.0
    """Item popularity cycles with this period (seconds of event time)."""
    popularity_amplitude: float = 0.8
    new_items_per_s: float = 2.0
    interest_drift: float = 0.01
    """Standard deviation of the per-request random walk step of a user's interest vector."""
    user_activity_std: float = 0.7
    """Spread of per-user engagement: some users act on much of what they see, others on little."""
    item_quality_std: float = 0.7
    max_delay_s: float = 8.0
    """Feedback arrives up to this long after its impression (keep it inside the joiner window)."""


OracleSink = Callable[[str, int, np.ndarray, np.ndarray], None]
"""Receives ``(request_id, user, items (k,), probs (k, T))``: the true probabilities of a request's labels."""


class Simulator:
    def __init__(self, config: SimulatorConfig = SimulatorConfig(), oracle: OracleSink | None = None) -> None:
        if len(config.target_rates) != len(TASKS):
            raise ValueError(f"target_rates needs {len(TASKS)} values, one per task {TASKS}")
        self.config = config
        self.oracle = oracle
        c = config
        self.rng = np.random.default_rng(c.seed)
        self.user_vec = self.rng.normal(0, 1, (c.n_users, c.dim)) / np.sqrt(c.dim)
        self.item_vec = self.rng.normal(0, 1, (c.n_items, c.dim)) / np.sqrt(c.dim)
        self.item_phase = self.rng.uniform(0, 2 * np.pi, c.n_items)
        self.item_quality = self.rng.normal(0, c.item_quality_std, c.n_items)
        self.user_activity = self.rng.normal(0, c.user_activity_std, c.n_users)
        # Each task mixes the shared affinity with a task-specific projection of it.
        self.task_mix = self.rng.normal(0, 1, (len(TASKS), c.dim, c.dim)) / np.sqrt(c.dim)
        self.task_bias = self._calibrate()
        # Users are Zipf-like: a few heavy users, a long tail. Drawn by inverting the cumulative weights, as
        # ``rng.choice(n_users, p=...)`` does (same draws), without its O(n_users) pass per request.
        weights = 1.0 / np.arange(1, c.n_users + 1) ** 0.8
        self.user_cdf = np.cumsum(weights / weights.sum())
        self.user_cdf /= self.user_cdf[-1]
        self.n_active_items = c.n_items // 2  # the other half arrive over time as "new items"
        self.requests = itertools.count()
        self._t0_s: float | None = None

    def _scores(self, users: np.ndarray, items: np.ndarray, t_s: float) -> np.ndarray:
        """Per-task logits without bias, shape (n, T)."""
        u, v = self.user_vec[users], self.item_vec[items]
        shared = np.einsum("nd,nd->n", u, v)
        specific = np.einsum("nd,tde,ne->nt", u, self.task_mix, v)
        popularity = self.config.popularity_amplitude * np.sin(
            2 * np.pi * t_s / self.config.popularity_period_s + self.item_phase[items]
        )
        base = self.item_quality[items] + self.user_activity[users] + popularity
        return 3.0 * shared[:, None] + 2.0 * specific + base[:, None]

    def _calibrate(self) -> np.ndarray:
        """Bisect each task's bias so the mean label rate matches its target."""
        rng = np.random.default_rng(self.config.seed + 1)
        users = rng.integers(0, self.config.n_users, 20_000)
        items = rng.integers(0, self.config.n_items, 20_000)
        scores = self._scores(users, items, 0.0)
        bias = np.zeros(len(TASKS))
        for t, target in enumerate(self.config.target_rates):
            lo, hi = -20.0, 20.0
            for _ in range(50):
                mid = (lo + hi) / 2
                rate = (1 / (1 + np.exp(-(scores[:, t] + mid)))).mean()
                lo, hi = (mid, hi) if rate < target else (lo, mid)
            bias[t] = (lo + hi) / 2
        return bias

    def events(self, start_ms: int, n_requests: int, rate: float | None = None) -> Iterator[dict]:
        """Events in event-time order for ``n_requests`` requests starting at ``start_ms``.

        With ``rate`` (requests per second) the stream is paced in wall-clock time and stamped with it;
        without, event time advances as if at ``rate or 100`` requests per second and nothing waits.
        """
        c = self.config
        step_ms = 1000.0 / (rate or 100.0)
        started = time.monotonic()
        pending: list[tuple[int, int, dict]] = []  # heap of (ts_ms, seq, feedback event)
        seq = itertools.count()
        for i in range(n_requests):
            if rate:
                ahead = started + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing: this is a rate limiter, not a wait for a condition
                now_ms = start_ms + int((time.monotonic() - started) * 1000)
            else:
                now_ms = start_ms + int(i * step_ms)
            while pending and pending[0][0] <= now_ms:
                yield heapq.heappop(pending)[2]
            for event in self._request(now_ms):
                if event["type"] == "feedback":
                    heapq.heappush(pending, (event["ts_ms"], next(seq), event))
                else:
                    yield event
        while pending:
            yield heapq.heappop(pending)[2]

    def _request(self, now_ms: int) -> list[dict]:
        c, rng = self.config, self.rng
        t_s = now_ms / 1000.0
        self._drift(t_s)
        user = int(self.user_cdf.searchsorted(rng.random(), side="right"))
        items = rng.choice(self.n_active_items, size=c.items_per_request, replace=False)  # distinct, as in a feed
        request_id = f"r{next(self.requests)}-{c.seed}"
        probs = 1 / (1 + np.exp(-(self._scores(np.full(len(items), user), items, t_s) + self.task_bias)))
        if self.oracle is not None:
            self.oracle(request_id, user, items.copy(), probs.copy())  # to the sink only, never into an event
        labels = rng.random(probs.shape) < probs  # (k, T)
        events: list[dict] = []
        for item, row in zip(items.tolist(), labels):
            events.append(impression(request_id, user, item, now_ms))
            play_ms = float(rng.gamma(2.0, 6000.0 if row[1] else 1500.0))
            delay_ms = int(rng.uniform(0.2, c.max_delay_s) * 1000)
            got = {name: 1 for name, hit in zip(TASKS, row) if hit}
            got[PLAY_TIME] = round(play_ms, 1)
            events.append(feedback(request_id, user, item, now_ms + delay_ms, got))
        return events

    def _drift(self, t_s: float) -> None:
        c, rng = self.config, self.rng
        if c.interest_drift:
            u = int(rng.integers(c.n_users))
            self.user_vec[u] += rng.normal(0, c.interest_drift, c.dim)
        if self._t0_s is None:
            self._t0_s = t_s
        arrived = int(c.n_items // 2 + c.new_items_per_s * (t_s - self._t0_s))
        self.n_active_items = min(c.n_items, max(self.n_active_items, arrived))
