"""A trainer worker as its own OS process, so tests can SIGKILL it: ``python -m tests.learner.worker_process ARGS``.

SIGTERM stops it gracefully (flush, checkpoint, commit); SIGKILL is the crash under test.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import replace
from pathlib import Path

from infra.pipeline import RunLayout, worker_config
from learner.worker import TrainerWorker


def main(root: str, bootstrap: str, topic: str, every: str, batch: str) -> None:
    config = worker_config(RunLayout(Path(root)), bootstrap=bootstrap, topic=topic, window_ms=1_500,
                           snapshot_every_steps=1_000, checkpoint_every_steps=int(every), batch_size=int(batch),
                           wandb_mode="disabled")
    config = replace(config, audit_path=Path(root) / "trained.csv")
    worker = TrainerWorker(config)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    print(f"started restored_step={worker.restored_step}", flush=True)
    worker.run()
    print(f"stopped poll_errors={worker.stream.source.poll_errors} commit_retries={worker.stream.stats.commit_retries} "
          f"below_checkpoint={worker.stream.stats.below_checkpoint}", flush=True)
    worker.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
