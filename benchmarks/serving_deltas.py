"""``bench serving`` while deltas arrive: the goal's cell on replicas that apply a stream of deltas (issue #22).

Issue #22's goal for serving: p99 at 100 candidates and concurrency 8 unchanged while deltas arrive, at 10^7 live
IDs. The replicas (two, as in the grid, HAProxy ingress, default ``ServingConfig``) serve the base of a chain made
by ``benchmarks.delta_chain``: the learner's default family and hparams with a collisionless table of dim 32 per
ID field, 10^7 live IDs split evenly over ``user_id`` and ``item_id`` (10^5 with ``--quick``), the tables full. Its
deltas are made beforehand, each as the trainer makes one (20 steps of batch 512, IDs Zipf-like over the
population, 1% new), and a publisher process at Ray's worker niceness (15) publishes them one after the other into
the replicas' store every ``interval_s``. Replaying them keeps the trainer's CPU off the two cores the replicas and the client
share: what is measured is the cost of *applying* deltas on the replicas (each under the lock a batch is scored
under, ``serving.weights``), plus the publisher's own writing, whose CPU is reported.

Anchor: the same load on the same replicas with no publisher, in the same run, alternating in rounds so a busy
neighbour hits every condition alike. Each round also runs the load while a second publisher process publishes the
same deltas into a copy of the store that no replica follows ("the publisher alone"): on this machine the
publisher shares the two cores with the replicas, where a deployment's trainer would not, and that condition tells
its share of the difference from the replicas' own. The order of the three conditions turns by one each round, so
that each comes first, second and third equally often: with a publisher that only spent its CPU and wrote
nothing, whichever condition came second in every round read a p99 well above the first's, a difference of place,
not of what ran (docs/serving.md has the figures). "Unchanged" is read as: the p99 with deltas within
``max(10%, 2 ms)`` of the p99 with the publisher alone, the same CPU spent on publishing, none on following: the
replicas' own cost of following deltas. Until 2026-12-07 it was read against the anchor without a publisher; the
publisher alone moved p99 by -0.6 to +6.7 ms in the runs of that day, often as much as the bound or more, which no
change to serving can touch (the row ``p99 against no publisher`` keeps that reading). The replicas report the
deltas they applied and the wall time of each apply under the lock (``/healthz`` ``weights``); the manifests give
each delta's bytes, the issue's goal is a delta of at most 5% of the base.

Memory at 10^7 IDs: the benchmark's process peaks at about 6 GB while it publishes the base (the learner's rows,
accumulators and ID maps, and the base's bytes), and frees the learner before the replicas start; each replica then
holds its copy of the model (2.4 GB resident against 0.8 GB at 10^5) after reading the 1.5 GB base once.

``python -m benchmarks.serving_deltas [--quick] [--ids N]`` runs this scenario alone.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks.delta_chain import (BATCH, DIM, NEW_ID_SHARE, PUBLISHER_NICE, STEPS_PER_DELTA, Chain, prepare_chain,
                                    publish_staged)
from benchmarks.embedding_paths import size_name
from benchmarks.harness import Report, Row
from benchmarks.http_load import Sample, closed_loop
from benchmarks.serving import (GOAL_AT, MODES, REPLICAS, TRAFFIC, TRAFFIC_QUICK, _pct, bodies, prepare,
                                replica_health, serve_on_free_port)
from benchmarks.timing import load_average

INTERVAL_S = 0.5
SETTLE_S = 1.0
"""After a delta round, the replicas' time to apply the last delta published (they poll every 0.1 s)."""
UNCHANGED_SHARE, UNCHANGED_MS = 0.10, 2.0
"""p99 with deltas "unchanged": at most ``max(UNCHANGED_SHARE * anchor, UNCHANGED_MS)`` above the anchor's."""
GOAL_DELTA_SHARE = 0.05
"""Issue #22: a delta of at most 5% of the base's bytes."""


@dataclass(frozen=True)
class Plan:
    ids: int
    """Live IDs in all, split evenly over ``user_id`` and ``item_id``."""
    rounds: int
    seconds: float
    warmup_s: float
    interval_s: float = INTERVAL_S
    replicas: int = REPLICAS
    """As many as ``bench serving``'s grid: one per core of the 2-core machine."""
    steps_per_delta: int = STEPS_PER_DELTA
    follower_nice: int | None = None
    """The replicas' ``serving.follower_nice``; None: the default."""
    switch_interval_ms: float | None = None
    """The replicas' ``serving.switch_interval_ms``; None: the default."""
    follower_nice_scope: str | None = None
    """The replicas' ``serving.follower_nice_scope``; None: the default."""

    @property
    def serving(self) -> dict:
        """The replicas' ``ServingConfig`` fields this plan sets (the rest at their defaults)."""
        return {k: v for k, v in (("follower_nice", self.follower_nice),
                                  ("switch_interval_ms", self.switch_interval_ms),
                                  ("follower_nice_scope", self.follower_nice_scope)) if v is not None}

    @property
    def deltas(self) -> int:
        """Deltas to stage: one per interval of every delta round (warm-up included), and a few to spare."""
        return self.rounds * math.ceil((self.seconds + self.warmup_s) / self.interval_s) + 4


FULL = Plan(10**7, rounds=6, seconds=5.0, warmup_s=1.0)
QUICK = Plan(10**5, rounds=1, seconds=2.0, warmup_s=0.5)


@dataclass
class Outcome:
    anchor: list[Sample]
    deltas: list[Sample]
    publisher_only: list[Sample] = field(default_factory=list)
    """The load while the deltas are published into a copy of the store that no replica follows."""
    published: int = 0
    """Deltas the publisher published during the delta rounds."""
    applied: dict[str, int] = field(default_factory=dict)
    """Per replica (as ``/healthz`` names it): deltas applied during the delta rounds."""
    weights: dict[str, dict] = field(default_factory=dict)
    """Per replica: ``/healthz`` ``weights`` at the end."""
    publisher_cpu_s: float = 0.0
    rss: dict[str, int] = field(default_factory=dict)
    """Per replica: resident bytes at the end."""
    load: tuple[str, str] = ("?", "?")
    """Load average before the first round (the replicas have just loaded the base) and after the last."""
    cpu: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    """Per condition (anchor, publisher, deltas): each round's CPU seconds of the replicas' processes over the
    load (its warm-up included) and the requests answered in it."""


def measure(env: dict[str, str], features, chain: Chain, plan: Plan, progress=None) -> Outcome:
    """Deploy ``plan.replicas`` rankers on ``chain``'s store (Ray started with ``env``, or the instance already
    running, which is left running), then per round the goal's cell without deltas and with the publisher on."""
    import psutil
    from ray import serve

    from serving.app import build_app
    from serving.config import ServingConfig

    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: not a fork of this one's Ray client
    stop = spawn.Event()
    shadow = chain.store.with_name(f"{chain.store.name}-unfollowed")
    shutil.copytree(chain.store, shadow, copy_function=os.link)  # the base, linked: no replica reads this copy
    publishers = {store: _Publisher(spawn, store, chain, plan, stop) for store in (chain.store, shadow)}
    main, unfollowed = publishers[chain.store], publishers[shadow]
    try:
        with serve_on_free_port(env, plan.replicas + 1) as port:
            serving = ServingConfig(num_replicas=plan.replicas, **plan.serving)
            serve.run(build_app(chain.store, features, serving), name="ranker-deltas", route_prefix="/")
            for publisher in publishers.values():
                if not publisher.ready.wait(120):
                    raise RuntimeError("the delta publisher did not start within 120 s")
            base = f"http://127.0.0.1:{port}"
            n, c = GOAL_AT
            payloads = bodies(n, 256, seed=n)
            outcome = Outcome([], [], load=(load_average(), "?"))

            replicas = [psutil.Process(h["pid"]) for h in replica_health(base, plan.replicas, asks=64).values()]

            def replica_cpu() -> float:
                try:
                    return sum(sum(p.cpu_times()[:2]) for p in replicas)
                except psutil.Error:
                    return float("nan")

            def load(publisher: _Publisher | None = None) -> Sample:
                if publisher is not None:
                    publisher.go.set()
                cpu = replica_cpu()
                try:
                    sample = asyncio.run(closed_loop(f"{base}/v1/rank", payloads, c, plan.seconds, plan.warmup_s))
                finally:
                    if publisher is not None:
                        publisher.go.clear()
                condition = "anchor" if publisher is None else "publisher" if publisher is unfollowed else "deltas"
                outcome.cpu.setdefault(condition, []).append((replica_cpu() - cpu, len(sample.latencies_s)))
                return sample

            def with_deltas() -> None:
                before, count = replica_health(base, plan.replicas, asks=64), main.published.value
                outcome.deltas.append(load(main))
                time.sleep(SETTLE_S)  # the last delta published reaches the replicas before they are asked
                after = replica_health(base, plan.replicas, asks=64)
                outcome.published += main.published.value - count
                for replica in before.keys() & after.keys():
                    done = after[replica]["weights"]["deltas_applied"] - before[replica]["weights"]["deltas_applied"]
                    outcome.applied[replica] = outcome.applied.get(replica, 0) + done

            conditions = [lambda: outcome.anchor.append(load()),
                          lambda: outcome.publisher_only.append(load(unfollowed)), with_deltas]
            task = progress.add_task("serving while deltas arrive", total=3 * plan.rounds) if progress else None
            for r in range(plan.rounds):
                for condition in conditions[r % 3:] + conditions[: r % 3]:  # each condition in each place alike
                    condition()
                if progress is not None:
                    progress.advance(task, 3)
            final = replica_health(base, plan.replicas, asks=64)
            outcome.weights = {replica: health["weights"] for replica, health in final.items()}
            for replica, health in final.items():
                try:
                    outcome.rss[replica] = psutil.Process(health["pid"]).memory_info().rss
                except psutil.Error:
                    pass
            outcome.publisher_cpu_s = main.cpu_s.value
            outcome.load = (outcome.load[0], load_average())
            return outcome
    finally:
        stop.set()
        for publisher in publishers.values():
            publisher.close()
        shutil.rmtree(shadow, ignore_errors=True)


class _Publisher:
    """A publisher process (``benchmarks.delta_chain.publish_staged``) for ``store``, publishing while ``go`` is set."""

    def __init__(self, spawn, store: Path, chain: Chain, plan: Plan, stop) -> None:
        self.go, self.ready = spawn.Event(), spawn.Event()
        self.published, self.cpu_s = spawn.Value("i", 0), spawn.Value("d", 0.0)
        self.process = spawn.Process(target=publish_staged, name=f"delta-publisher-{store.name}", daemon=True,
                                     args=(str(store), [str(p) for p in chain.staged], plan.interval_s, self.go, stop,
                                           self.ready, self.published, self.cpu_s))
        self.process.start()

    def close(self) -> None:
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


def delta_bytes(store: Path) -> list[int]:
    """Each published delta's bytes, from the manifests."""
    from learner.snapshots import SnapshotStore

    return [m.bytes or 0 for m in SnapshotStore(store).list() if m.kind == "delta"]


def add_rows(report: Report, mode: str, plan: Plan, chain: Chain, outcome: Outcome) -> None:
    n, c = GOAL_AT
    scenario = f"{mode}: while deltas arrive ({size_name(plan.ids)} IDs, emb {DIM})"
    label = f"{scenario}: {n} candidates, concurrency {c}"
    anchor = "no deltas, same replicas"
    errors = sum(s.errors for s in outcome.deltas), sum(s.errors for s in outcome.anchor)
    if any(errors):
        report.notes.append(f"{label}: {errors[0]} failed requests with deltas, {errors[1]} without")
    report.add(Row(f"{label}: p50", _pct(outcome.deltas, 50), "ms", anchor=anchor,
                   anchor_value=_pct(outcome.anchor, 50)))
    p99, anchor_p99 = _pct(outcome.deltas, 99), _pct(outcome.anchor, 99)
    alone = _pct(outcome.publisher_only, 99) if outcome.publisher_only else None
    # The goal is read against the publisher alone: the publisher stands in for a trainer, which a deployment does
    # not run on its replicas' cores, and on this machine it shares them (docs/serving.md, "While deltas arrive").
    base, base_p99 = (("the publisher alone (its store followed by no replica)", alone) if alone is not None
                      else (anchor, anchor_p99))
    allowed = max(UNCHANGED_SHARE * base_p99, UNCHANGED_MS)
    report.add(Row(f"{label}: p99", p99, "ms", anchor=base, anchor_value=base_p99,
                   goal=f"unchanged: <= anchor + max({UNCHANGED_SHARE:.0%}, {UNCHANGED_MS:g} ms)",
                   met=bool(p99 <= base_p99 + allowed)))
    report.add(Row(f"{label}: throughput", statistics.median(s.rate for s in outcome.deltas), "req/s", anchor=anchor,
                   anchor_value=statistics.median(s.rate for s in outcome.anchor)))
    if alone is not None:
        report.add(Row(f"{label}: p99 against no publisher", p99, "ms", anchor=anchor, anchor_value=anchor_p99))
        report.add(Row(f"{label}: p99, the publisher alone (its store followed by no replica)", alone, "ms",
                       anchor=anchor, anchor_value=anchor_p99))
    per_request = {condition: 1000 * sum(c for c, _ in rounds) / max(1, sum(n for _, n in rounds))
                   for condition, rounds in outcome.cpu.items()}
    if "deltas" in per_request and "anchor" in per_request:
        report.add(Row(f"{label}: the replicas' CPU per request answered (warm-up included)", per_request["deltas"],
                       "ms", anchor=anchor, anchor_value=per_request["anchor"]))
    applied = min(outcome.applied.values(), default=0)
    report.add(Row(f"{scenario}: deltas applied per replica", applied, "deltas", anchor="deltas published",
                   anchor_value=outcome.published))
    for q in (50, 99):
        worst = [w[f"apply_ms_p{q}"] for w in outcome.weights.values() if w.get(f"apply_ms_p{q}") is not None]
        report.add(Row(f"{scenario}: apply time on a replica (lock held): p{q}", max(worst) if worst else float("nan"),
                       "ms"))
        worst = [w[f"apply_cpu_ms_p{q}"] for w in outcome.weights.values() if w.get(f"apply_cpu_ms_p{q}") is not None]
        report.add(Row(f"{scenario}: apply CPU on a replica (the installing thread's, lock held): p{q}",
                       max(worst) if worst else float("nan"), "ms"))
        worst = [w[f"prepare_ms_p{q}"] for w in outcome.weights.values() if w.get(f"prepare_ms_p{q}") is not None]
        report.add(Row(f"{scenario}: prepare time on a replica (checks, map merges; no lock): p{q}",
                       max(worst) if worst else float("nan"), "ms"))
        worst = [w[f"settle_ms_p{q}"] for w in outcome.weights.values() if w.get(f"settle_ms_p{q}") is not None]
        report.add(Row(f"{scenario}: settle time on a replica (rows written into the tables; no lock): p{q}",
                       max(worst) if worst else float("nan"), "ms"))
    sizes = delta_bytes(chain.store)
    median = statistics.median(sizes) if sizes else float("nan")
    report.add(Row(f"{scenario}: base", chain.base_bytes / 1e6, "MB"))
    report.add(Row(f"{scenario}: bytes per delta (median)", median / 1e6, "MB"))
    share = median / chain.base_bytes if chain.base_bytes else float("nan")
    report.add(Row(f"{scenario}: delta / base (median)", 100 * share, "%", goal=f"<= {GOAL_DELTA_SHARE:.0%}",
                   met=bool(share <= GOAL_DELTA_SHARE)))
    per_delta = outcome.publisher_cpu_s / outcome.published * 1000 if outcome.published else float("nan")
    report.add(Row(f"{scenario}: publisher CPU per delta", per_delta, "ms"))
    replicas = "; ".join(
        f"{r}: {outcome.applied.get(r, '?')} applied, apply p50/p99/max {w['apply_ms_p50']}/{w['apply_ms_p99']}/"
        f"{w['apply_ms_max']} ms (CPU p50 {w.get('apply_cpu_ms_p50')} ms; {w.get('installed_by_scorer')} installed by "
        f"the scoring thread), prepare p50/p99 {w.get('prepare_ms_p50')}/{w.get('prepare_ms_p99')} ms, "
        f"settle p50/p99 {w.get('settle_ms_p50')}/{w.get('settle_ms_p99')} ms, "
        f"the follower's CPU per delta p50/p99 {w.get('follow_cpu_ms_p50')}/{w.get('follow_cpu_ms_p99')} ms, "
        f"{w['folds']} folds, {w['rebuilds']} rebuilds"
        + (f", RSS {outcome.rss[r] / 2**30:.2f} GiB" if r in outcome.rss else "")
        for r, w in outcome.weights.items())
    report.notes.append(f"{scenario}: per replica over the run: {replicas or 'no replica answered /healthz'}")
    if outcome.cpu:
        rounds_text = "; ".join(f"{condition} " + ", ".join(f"{c:.2f} s / {n}" for c, n in rounds)
                                for condition, rounds in outcome.cpu.items())
        report.notes.append(f"{scenario}: the replicas' CPU seconds and requests answered per round, by condition: "
                            f"{rounds_text}")
    window = plan.rounds * (plan.seconds + plan.warmup_s)
    report.notes.append(
        f"{scenario}: {plan.rounds} round(s) of {plan.seconds:g} s (after {plan.warmup_s:g} s of warm-up) without, "
        f"with the publisher alone, then with deltas; {outcome.published} deltas published one every {plan.interval_s:g} s by a process at nice "
        f"{PUBLISHER_NICE} ({outcome.publisher_cpu_s:.2f} CPU-s in all, {outcome.publisher_cpu_s / window:.1%} of "
        f"a core over the delta rounds); {len(sizes)} delta manifests, sizes {min(sizes, default=0):,}-"
        f"{max(sizes, default=0):,} B; each delta {plan.steps_per_delta} steps of batch {BATCH}, IDs Zipf-like over "
        f"the population with {NEW_ID_SHARE:.0%} new; {plan.replicas} replicas (default ServingConfig"
        f"{''.join(f', {k} {v}' for k, v in plan.serving.items())}); preparation "
        + ", ".join(f"{k} {v:.1f} s" for k, v in chain.seconds.items())
        + f"; load average {chain.load} before the preparation, {outcome.load[0]} before the first round (after "
        f"the replicas loaded the base), {outcome.load[1]} after the last")


def measure_into(report: Report, features, root: Path, plan: Plan, mode: str, env: dict[str, str],
                 progress=None) -> None:
    """Prepare the chain in ``root``, measure, add the rows; a failure is a note, as a mode's is."""
    try:
        chain = prepare_chain(root, plan.ids, plan.deltas, plan.steps_per_delta, progress)
        gc.collect()  # the learner's tables go before the replicas load theirs
        outcome = measure(env, features, chain, plan, progress)
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the benchmark still counts
        report.notes.append(f"{mode}: while deltas arrive: could not be measured: {type(exc).__name__}: "
                            f"{str(exc)[:300]}")
        return
    add_rows(report, mode, plan, chain, outcome)


def run(quick: bool = False, ids: int | None = None, follower_nice: int | None = None,
        switch_interval_ms: float | None = None, follower_nice_scope: str | None = None) -> Report:
    """This scenario alone, with ``bench serving``'s feature store."""
    from rich.progress import Progress

    plan = replace(QUICK if quick else FULL, follower_nice=follower_nice, switch_interval_ms=switch_interval_ms,
                   follower_nice_scope=follower_nice_scope)
    if ids is not None:
        plan = replace(plan, ids=ids)
    report = Report("serving")
    with tempfile.TemporaryDirectory() as tmp, Progress(transient=True) as progress:
        features, _ = prepare(Path(tmp), n_events=TRAFFIC_QUICK if quick else TRAFFIC)
        measure_into(report, features, Path(tmp) / "deltas", plan, "haproxy", MODES["haproxy"], progress)
    report.notes.append(f"bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.ids:,} IDs, one short round")
    parser.add_argument("--ids", type=int, default=None, help="live IDs in all, split over user_id and item_id")
    parser.add_argument("--follower-nice", type=int, default=None,
                        help="the replicas' serving.follower_nice (default: ServingConfig's)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="the replicas' serving.switch_interval_ms (default: ServingConfig's)")
    parser.add_argument("--follower-nice-scope", default=None,
                        help="the replicas' serving.follower_nice_scope (default: ServingConfig's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("follower_nice", args.follower_nice),
                                   ("switch_interval_ms", args.switch_interval_ms),
                                   ("follower_nice_scope", args.follower_nice_scope)) if v is not None}
    if overrides:
        from serving.config import ServingConfig

        try:  # refused now, with the config's own message, not after minutes of preparation
            ServingConfig(**overrides)
        except ValueError as exc:
            parser.error(str(exc))
    report = run(quick=args.quick, ids=args.ids, follower_nice=args.follower_nice,
                 switch_interval_ms=args.switch_interval_ms, follower_nice_scope=args.follower_nice_scope)
    report.print()
    if args.json:
        report.write_json(args.json)


if __name__ == "__main__":
    main()


__all__ = ["FULL", "QUICK", "Outcome", "Plan", "add_rows", "delta_bytes", "measure", "measure_into", "run"]
