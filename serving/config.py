"""How the ranking service runs: replicas or autoscaling, request limits, fused-score weights, batching.

``ServingConfig.from_dict`` is the strict loader: an unknown key is an error naming its path
(``serving.autoscaling.max_replica``), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from learner.priority import LOWEST
from stream.events import TASKS

DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "click": 1.0, "long_view": 1.0, "like": 2.0, "comment": 3.0, "follow": 4.0, "forward": 3.0,
}
"""Fused score ``sum_t w_t * p_t``: rarer, stronger signals of interest weigh more (value-model style)."""


USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
"""Ray Serve's switch between a user-code thread (its default) and the replica's main loop."""


def _number(value: Any, path: str, *, low: float | None = None, integer: bool = False) -> None:
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{path} must be {kind}, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{path} must be >= {low}, got {value!r}")


FOLLOWER_NICE_SCOPES = ("bulk", "all")
"""The values of ``serving.follower_nice_scope``."""
MIN_SWITCH_INTERVAL_MS = 0.01
"""The shortest ``serving.switch_interval_ms`` accepted: a guard against a value (or a unit mistake, seconds for
milliseconds the other way round) that would have the threads spend their time handing the lock over."""


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve's request-based autoscaling, in its own names (``autoscaling_config``)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    """Requests in flight per replica the autoscaler aims at; batching wants several, so not 1."""
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0

    def __post_init__(self) -> None:
        _number(self.min_replicas, "serving.autoscaling.min_replicas", low=0, integer=True)
        _number(self.max_replicas, "serving.autoscaling.max_replicas", low=1, integer=True)
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"serving.autoscaling.max_replicas ({self.max_replicas}) must be >= min_replicas "
                             f"({self.min_replicas})")
        _number(self.target_ongoing_requests, "serving.autoscaling.target_ongoing_requests", low=1e-9)
        _number(self.upscale_delay_s, "serving.autoscaling.upscale_delay_s", low=0)
        _number(self.downscale_delay_s, "serving.autoscaling.downscale_delay_s", low=0)

    def serve_options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ServingConfig:
    num_replicas: int = 1
    """Fixed replica count; ignored (must stay 1) when ``autoscaling`` is set."""
    autoscaling: AutoscalingConfig | None = None
    max_candidates: int = 1000
    """Most candidates one ranking request may carry; more is a 422."""
    task_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS))
    """Weight of each task's probability in the fused score; a task left out weighs 0."""
    max_batch_candidates: int = 4096
    """Requests are batched across callers until their candidates would exceed this (``@serve.batch``)."""
    batch_wait_timeout_s: float = 0.002
    """How long the first request of a batch waits for others to join it. Scoring a batch has a fixed cost
    (one feature-store read, one forward pass) that a few milliseconds of waiting spread over several
    requests: at concurrency 8 on 2 cores, 2 ms took batches from 1.2 to 3 requests, CPU per request down by a
    quarter and p99 from 31-35 to 24-26 ms (``docs/serving.md``); an idle service pays the 2 ms on every
    request. 0: a batch takes only what queued while the previous one ran."""
    max_ongoing_requests: int = 64
    """Requests a replica accepts at once; the rest queue in the proxy (and drive autoscaling)."""
    max_body_bytes: int = 64 * 1024
    """Larger request bodies are refused with 413 before parsing (1000 int64 ids are about 21 KB)."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per replica; torch's intra-op threads follow it (at least one)."""
    poll_s: float = 0.1
    """How often a replica looks for a new snapshot."""
    follower_nice: int = 19
    """Steps of niceness (Linux, 0-19) the replica's weight follower adds to the replica's own for its bulk work
    (see ``follower_nice_scope``), as databases run compactions below their queries: on a saturated node the
    requests come first and a delta is applied in the CPU they leave (Linux weighs a thread at niceness 19 as 15
    against 1024 at 0 and 36 at 15, a Ray worker's niceness; there any value from 4 up means 19). 0: the requests'
    priority. What holds the lock a batch is scored under never runs at it (``serving.weights``)."""
    follower_nice_scope: str = "bulk"
    """What of the follower's work runs at ``follower_nice``. ``"bulk"``: what lets the interpreter's lock go
    while it works (reading a version's bytes and hashing them, writing a delta's rows into the tables, a fold's
    plan, a new base's load); a delta's decoding, checks and map merges, Python that holds the lock, run at the
    requests' priority. ``"all"``: all of it. A thread the OS keeps off the CPU while it holds the interpreter's
    lock stalls the replica's scoring thread until it runs again, which at niceness 19 on a saturated node is
    long (``benchmarks.gil_probe`` measures that wait; ``docs/serving.md`` has the figures)."""
    switch_interval_ms: float = 0.5
    """How long a replica's Python thread may hold the interpreter's lock while another waits for it
    (``sys.setswitchinterval``; Python's default is 5 ms). A replica runs its weight follower beside its requests in
    one interpreter: when the scoring thread wakes (a request arrives, a torch op returns) while the follower runs
    Python, it waits up to this long for the lock (``benchmarks.gil_probe`` measures that wait; ``docs/serving.md``
    has the figures)."""
    access_log: bool = False
    """Serve's per-request access log in the replica (costs time on every request; off by default)."""
    user_code_thread: bool = False
    """Run the replica's user code (the FastAPI app, ``@serve.batch``, scoring) on a thread of its own, as Ray
    Serve does by default, or on the replica's main event loop beside its HTTP server (ours). On the main
    loop a request skips two hand-overs between threads: in three interleaved A/B runs at concurrency 8 on 2
    cores, 0-3% more requests/s and 0.6-2.3 ms lower pooled p99 (``docs/serving.md``), small beside the
    round-to-round spread but always the same way. While a batch scores (a few ms) the replica's HTTP server
    waits; on a saturated replica it had no CPU to run on anyway."""
    item_cache_ttl_ms: float = 500.0
    """Longest an item's feature row is served from the replica's cache after it was read from the store: a
    row the trainer pushes is served from at most this long after the push. 0 turns the cache off (every batch
    reads every item). 500 ms adds at most half a second (a quarter on average) to the age of the item
    features served, a quarter of the 2 s event-to-served freshness goal, while a candidate scored a few times
    a second by a replica is read from the store about twice a second instead of on every request
    (``docs/serving.md``). Users are never cached: each request's user is another."""
    item_cache_size: int = 65_536
    """Items the cache holds at most (sets of 4 slots: rounded up to a multiple of 4); about 210 bytes each,
    14 MB in all at the default. A full cache replaces the entry read longest ago in the item's set."""
    api_tokens_file: str | None = None
    """A file of API tokens, one per line, that every request but ``/healthz`` and the docs must present as
    ``Authorization: Bearer <token>``; it must exist on each node that runs a replica. Only its path belongs
    here, never a token. The environment adds ``MOESTREAM_API_TOKENS`` and ``MOESTREAM_API_TOKENS_FILE``
    (``serving.auth``); with none of the three the API is open."""

    def __post_init__(self) -> None:
        _number(self.num_replicas, "serving.num_replicas", low=1, integer=True)
        if self.autoscaling is not None and self.num_replicas != 1:
            raise ValueError("serving.num_replicas and serving.autoscaling exclude each other; set one")
        _number(self.max_candidates, "serving.max_candidates", low=1, integer=True)
        _number(self.max_batch_candidates, "serving.max_batch_candidates", low=1, integer=True)
        if self.max_batch_candidates < self.max_candidates:
            raise ValueError(f"serving.max_batch_candidates ({self.max_batch_candidates}) must be >= "
                             f"max_candidates ({self.max_candidates}): one request must fit in a batch")
        _number(self.batch_wait_timeout_s, "serving.batch_wait_timeout_s", low=0)
        _number(self.max_ongoing_requests, "serving.max_ongoing_requests", low=1, integer=True)
        _number(self.max_body_bytes, "serving.max_body_bytes", low=1024, integer=True)
        _number(self.num_cpus, "serving.num_cpus", low=0)
        _number(self.poll_s, "serving.poll_s", low=1e-3)
        _number(self.follower_nice, "serving.follower_nice", low=0, integer=True)
        if self.follower_nice > LOWEST:
            raise ValueError(f"serving.follower_nice must be <= {LOWEST} (Linux's lowest priority), "
                             f"got {self.follower_nice!r}")
        if self.follower_nice_scope not in FOLLOWER_NICE_SCOPES:
            raise ValueError(f"serving.follower_nice_scope must be one of {list(FOLLOWER_NICE_SCOPES)}, "
                             f"got {self.follower_nice_scope!r}")
        _number(self.switch_interval_ms, "serving.switch_interval_ms", low=MIN_SWITCH_INTERVAL_MS)
        _number(self.item_cache_ttl_ms, "serving.item_cache_ttl_ms", low=0)
        _number(self.item_cache_size, "serving.item_cache_size", low=1, integer=True)
        if self.api_tokens_file is not None and (not isinstance(self.api_tokens_file, str) or not self.api_tokens_file):
            raise ValueError(f"serving.api_tokens_file must be a file path or null, got {self.api_tokens_file!r}")
        for name in ("access_log", "user_code_thread"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"serving.{name} must be true or false, got {getattr(self, name)!r}")
        stray = sorted(set(self.task_weights) - set(TASKS))
        if stray:
            raise ValueError(f"serving.task_weights names unknown task(s) {stray}; tasks are {list(TASKS)}")
        for task, weight in self.task_weights.items():
            _number(weight, f"serving.task_weights.{task}")
        if not any(w != 0 for w in self.task_weights.values()):
            raise ValueError("serving.task_weights must give some task a non-zero weight")

    @property
    def torch_threads(self) -> int:
        return max(1, int(self.num_cpus))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options`` for the ranking deployment."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if not self.user_code_thread:  # Serve reads it in the replica's process, at start-up
            actor["runtime_env"] = {"env_vars": {USER_CODE_THREAD_ENV: "0"}}
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": actor,
            "logging_config": {"log_level": "WARNING", "enable_access_log": self.access_log},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.serve_options()
        else:
            options["num_replicas"] = self.num_replicas
        return options

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str = "serving") -> ServingConfig:
        """Build from plain data (YAML, JSON); unknown keys are errors naming their path."""
        _known(data, cls, path)
        kwargs = dict(data)
        if kwargs.get("autoscaling") is not None:
            _known(kwargs["autoscaling"], AutoscalingConfig, f"{path}.autoscaling")
            kwargs["autoscaling"] = AutoscalingConfig(**kwargs["autoscaling"])
        if "task_weights" in kwargs:
            if not isinstance(kwargs["task_weights"], Mapping):
                raise ValueError(f"{path}.task_weights must be a mapping of task to weight")
            kwargs["task_weights"] = dict(kwargs["task_weights"])
        return cls(**kwargs)


def _known(data: Any, cls: type, path: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; known: {sorted(names)}")


__all__ = ["DEFAULT_TASK_WEIGHTS", "FOLLOWER_NICE_SCOPES", "AutoscalingConfig", "ServingConfig"]
