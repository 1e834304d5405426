"""How late a replica's Python thread gets the CPU back while its weight follower applies deltas (``python -m
benchmarks.gil_probe``).

A replica scores on one Python thread and follows versions on others (``serving.weights``), in one interpreter:
whenever the scoring thread wakes (a request arrives, a torch op returns and wants the interpreter back) while the
follower runs Python, it waits for the interpreter's lock, up to the switch interval (``serving.switch_interval_ms``)
when the follower is running, longer when the follower holds the lock while the OS runs something else. This
measures that wait apart from everything else ``bench serving``'s deltas cell mixes into its p99.

Each run is a process of its own, at a Ray worker's niceness (15), on a node kept busy by ``HOGS`` processes at the
same niceness (a second replica, the proxy): a publisher (``benchmarks.delta_chain``, niceness 15) publishes the
staged deltas of a chain at ``ids`` live IDs every 0.5 s into a copy of the chain's store, which the process's
``WeightFollower`` follows (``serving.follower_nice``, the default), while a probe thread sleeps 1 ms at a time and
records how late it woke, with a little numpy work in between, as a scoring thread does. Conditions: no follower (the
anchor: what the busy node costs alone), and a follower at each switch interval and each scope of its niceness
(``serving.follower_nice_scope``: its bulk work only, or all of it) asked for. Runs alternate, the order turned every
round. docs/serving.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import Report, Row
from serving.config import FOLLOWER_NICE_SCOPES

HOGS = 2
"""Busy processes beside the probe's: on the 2-core machine, every core has something else to run."""
SLEEP_S = 0.001
INTERVAL_S = 0.5
"""The publisher's delta interval, as in ``bench serving``'s deltas cell."""
NO_FOLLOWER = "no follower"


Condition = tuple[float, str] | None
"""A follower's switch interval (ms) and ``serving.follower_nice_scope``; None: no follower."""


def condition_name(condition: Condition) -> str:
    if condition is None:
        return NO_FOLLOWER
    switch_ms, scope = condition
    return f"follower, nice scope {scope}, switch interval {switch_ms:g} ms"


def _hog(stop) -> None:
    os.nice(15)
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def probe(base: Path, staged: list[str], switch_ms: float | None, seconds: float, out: Path,
          scope: str = "bulk") -> dict:
    """One run, in this process (``--child``): the wake-up lateness of every sleep (ms) saved to ``out``; what the
    follower applied."""
    import multiprocessing as mp

    import torch

    from benchmarks.delta_chain import publish_staged
    from learner.snapshots import SnapshotStore
    from serving.config import ServingConfig
    from serving.weights import StoreSource, WeightFollower

    os.nice(15)  # a Ray worker's
    torch.set_num_threads(1)
    if switch_ms is not None:
        sys.setswitchinterval(switch_ms / 1000)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "snapshots"
        shutil.copytree(base, store)
        go, stop, ready, hogs_stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
        published, cpu_s = ctx.Value("i", 0), ctx.Value("d", 0.0)
        publisher = ctx.Process(target=publish_staged, args=(str(store), staged, INTERVAL_S, go, stop, ready,
                                                             published, cpu_s))
        publisher.start()
        follower = None
        try:
            if not ready.wait(120):
                raise RuntimeError("the publisher did not start within 120 s")
            if switch_ms is not None:
                follower = WeightFollower(StoreSource(SnapshotStore(store)), poll_s=ServingConfig().poll_s,
                                          nice=ServingConfig().follower_nice, nice_scope=scope)
                deadline = time.monotonic() + 120
                while follower.current is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if follower.current is None:
                    raise RuntimeError("the follower did not load the base within 120 s")
            hogs = [ctx.Process(target=_hog, args=(hogs_stop,)) for _ in range(HOGS)]
            for hog in hogs:
                hog.start()
            go.set()
            work, late = np.random.default_rng(0).random(2000), []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                time.sleep(SLEEP_S)
                late.append(time.perf_counter() - started - SLEEP_S)
                for _ in range(50):
                    work.sum()
            go.clear()
            stop.set()
            publisher.join(30)
            hogs_stop.set()
            for hog in hogs:
                hog.join()
            deadline = time.monotonic() + 60  # what was published, applied (the probe's rows say how many)
            while (follower is not None and follower.current.version < 1 + published.value
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        finally:
            stop.set()
            publisher.join(30)
            applied = follower.figures()["deltas_applied"] if follower is not None else None
            if follower is not None:
                follower.close()
    np.save(out, np.asarray(late) * 1e3)
    return {"published": published.value, "applied": applied}


def run(ids: int = 10**6, rounds: int = 3, seconds: float = 10.0, switch_ms: tuple[float, ...] = (0.5,),
        scopes: tuple[str, ...] = ("all", "bulk")) -> Report:
    from benchmarks.delta_chain import DIM, prepare_chain

    conditions: list[Condition] = [None, *((s, scope) for s in switch_ms for scope in scopes)]
    report = Report("gil_probe")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        chain = prepare_chain(root / "chain", ids, n_deltas=int(seconds / INTERVAL_S) + 4)
        staged = [str(p) for p in chain.staged]
        late: dict[Condition, list[np.ndarray]] = {c: [] for c in conditions}
        applied: dict[Condition, list[int]] = {c: [] for c in conditions}
        published: dict[Condition, list[int]] = {c: [] for c in conditions}
        for r in range(rounds):
            for k in range(len(conditions)):
                condition = conditions[(k + r) % len(conditions)]  # the order turned every round
                out = root / f"late-{r}-{k}.npy"
                args = {"base": str(chain.store), "staged": staged, "seconds": seconds, "out": str(out),
                        "switch_ms": None if condition is None else condition[0],
                        "scope": None if condition is None else condition[1]}
                done = subprocess.run([sys.executable, "-m", "benchmarks.gil_probe", "--child", json.dumps(args)],
                                      capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"a probe run failed ({condition_name(condition)}): {done.stderr[-2000:]}")
                late[condition].append(np.load(out))
                counts = json.loads(done.stdout.strip().splitlines()[-1])
                applied[condition].append(counts["applied"])
                published[condition].append(counts["published"])
    anchor = np.concatenate(late[None])
    anchor_p99 = float(np.percentile(anchor, 99))
    for condition in conditions:
        pooled = np.concatenate(late[condition])
        name = condition_name(condition)
        for stat, value in (("p50", np.percentile(pooled, 50)), ("p99", np.percentile(pooled, 99)),
                            ("p99.9", np.percentile(pooled, 99.9)), ("max", pooled.max())):
            anchored = condition is not None and stat == "p99"
            report.add(Row(f"{name}: wake-up lateness {stat}", float(value), "ms",
                           anchor=NO_FOLLOWER if anchored else None, anchor_value=anchor_p99 if anchored else None))
        report.add(Row(f"{name}: wake-ups over 5 ms", float((pooled > 5).mean() * 1e4), "per 10,000"))
        report.add(Row(f"{name}: deltas published", float(sum(published[condition])), "deltas"))
        if condition is not None:
            report.add(Row(f"{name}: deltas applied", float(sum(applied[condition])), "deltas"))
    report.notes += [
        f"{ids:,} live IDs (dim {DIM} per ID field), a delta every {INTERVAL_S} s; {rounds} rounds of {seconds:g} s per "
        f"condition, the order turned every round; {HOGS} busy processes and the publisher at niceness 15, the probe's "
        "process at 15, its follower at serving.follower_nice's default over the scope named",
        f"the chain's preparation: {', '.join(f'{k} {v:.0f} s' for k, v in chain.seconds.items())}; load average "
        f"before it {chain.load}",
    ]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=10**6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--switch-ms", type=float, nargs="+", default=[0.5],
                        help="the switch intervals to run the follower at (ms)")
    parser.add_argument("--scopes", nargs="+", default=["all", "bulk"],
                        help="the scopes of the follower's niceness to run it at (serving.follower_nice_scope)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(probe(Path(spec["base"]), spec["staged"], spec["switch_ms"], spec["seconds"],
                               Path(spec["out"]), spec["scope"] or "bulk")))
        return
    for bad, why in ((args.ids < 2, f"--ids must be at least 2, got {args.ids}"),
                     (args.rounds < 1, f"--rounds must be at least 1, got {args.rounds}"),
                     (not args.seconds > 0, f"--seconds must be above 0, got {args.seconds:g}"),
                     (not all(s > 0 for s in args.switch_ms), f"every --switch-ms must be above 0, got {args.switch_ms}"),
                     (not set(args.scopes) <= set(FOLLOWER_NICE_SCOPES),
                      f"every --scopes must be one of {list(FOLLOWER_NICE_SCOPES)}, got {args.scopes}")):
        if bad:
            parser.error(why)
    report = run(args.ids, args.rounds, args.seconds, tuple(args.switch_ms), tuple(dict.fromkeys(args.scopes)))
    report.print()
    if args.json:
        report.write_json(args.json)


if __name__ == "__main__":
    main()


__all__ = ["condition_name", "probe", "run"]
