"""Trainer checkpoints: everything needed to resume a worker exactly, written atomically, never pickled.

One checkpoint is a directory ``ckpt-<step>/`` with

``model.safetensors``       model weights
``optimizer.safetensors``   optimizer tensors (Adam moments, steps), flattened as ``state.<param>.<name>``
``arrays.safetensors``      numpy state: the streaming aggregates' running sums, the metrics' histograms
``joiner.arrow``            the label joiner's state (pending and recently emitted impressions)
``buffer.arrow``            joined examples emitted but not yet trained on
``meta.json``               step, counters, optimizer hyper-parameters, the offsets the state covers

It is written into a temporary directory, every file fsynced, then renamed into place and ``LATEST`` updated:
a reader sees a whole checkpoint or the previous one. Only after that may the offsets be committed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save as numpy_bytes
from safetensors.torch import load_file, save_file

from learner.snapshots import Streamed, safetensors_parts, write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (e.g. the directory is not writable) or read."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor | Streamed]
    """The weights; a table written beside training is streamed from its snapshot as the file is written."""
    optimizer: dict
    arrays: dict[str, np.ndarray]
    joiner: bytes
    buffer: pa.Table
    meta: dict


def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON (hyper-parameters)."""
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _numpy_parts(arrays: dict[str, np.ndarray]) -> list[memoryview]:
    """``arrays`` as a safetensors file, streamed from their memory (``safetensors_parts``); with a dtype torch does
    not hold, the library's bytes."""
    try:
        with warnings.catch_warnings():  # read only: a read-only array is as good as any
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    except TypeError:
        return [memoryview(numpy_bytes({k: np.ascontiguousarray(v) for k, v in arrays.items()}))]
    return safetensors_parts(tensors)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


SPARE = ".spare"
"""Where a checkpoint directory keeps the large files of the last pruned checkpoint, which the next one is written
over (:meth:`CheckpointStore._retire`): between two checkpoints the directory holds one checkpoint's worth of them
more than ``keep``."""
RECYCLED = ("model.safetensors", "arrays.safetensors")


class CheckpointStore:
    def __init__(self, directory: Path, keep: int = 2) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.pinned: int | None = None
        """A step never pruned: a group's last agreed checkpoint (newer ones may not exist on every worker)."""

    def write(self, ckpt: Checkpoint) -> Path:
        """Write atomically; raises :class:`CheckpointError` (never a half-written checkpoint)."""
        final = self.directory / f"ckpt-{ckpt.step:09d}"
        tmp = self.directory / f".tmp-ckpt-{ckpt.step:09d}-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            opt_tensors, opt_meta = optimizer_tensors(ckpt.optimizer)
            # The large files are streamed from the tensors' memory (or the tables' snapshots) and synced as they are
            # written, around the page cache (``learner.snapshot_files``): the library's writer builds each in one
            # buffer holding the GIL, a file of gigabytes synced at the end makes every other fsync of the machine
            # wait behind it, and a buffered write costs the writing thread and the kernel's writeback CPU that
            # training needs; nothing reads a checkpoint soon.
            model = {k: v if isinstance(v, Streamed) else v.detach().cpu().contiguous() for k, v in ckpt.model.items()}
            spare = self.directory / SPARE
            write_atomic(tmp / "model.safetensors", safetensors_parts(model), direct=True, over=spare / "model.safetensors")
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            write_atomic(tmp / "arrays.safetensors", _numpy_parts(ckpt.arrays), direct=True,
                         over=spare / "arrays.safetensors")
            (tmp / "joiner.arrow").write_bytes(ckpt.joiner)
            _write_arrow(tmp / "buffer.arrow", ckpt.buffer)
            (tmp / "meta.json").write_bytes(orjson.dumps({**ckpt.meta, "step": ckpt.step, "optimizer": opt_meta}))
            for f in tmp.iterdir():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = self.directory / f".LATEST.tmp-{os.getpid()}"
            with open(latest_tmp, "w") as handle:
                handle.write(final.name)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(latest_tmp, self.directory / "LATEST")
            _fsync_dir(self.directory)
        except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            if self.directory.exists() and not self.directory.is_dir():  # else the error reads "File exists"
                raise CheckpointError(f"cannot write checkpoint to {self.directory}: it is not a directory") from exc
            raise CheckpointError(f"cannot write checkpoint to {self.directory}: {exc}") from exc
        self._prune(final.name)
        return final

    def latest(self) -> Checkpoint | None:
        try:
            name = (self.directory / "LATEST").read_text().strip()
        except FileNotFoundError:
            return None
        return self._read(self.directory / name)

    def load(self, step: int) -> Checkpoint:
        """The checkpoint of ``step`` (a group restores the step every worker made durable, see
        ``learner.worker``); :class:`CheckpointError` if it is missing or unreadable."""
        return self._read(self.directory / f"ckpt-{step:09d}")

    def _read(self, path: Path) -> Checkpoint:
        try:
            meta = orjson.loads((path / "meta.json").read_bytes())
            with pa.OSFile(str(path / "buffer.arrow"), "rb") as source:
                buffer = pa.ipc.open_stream(source).read_all()
            return Checkpoint(
                step=meta["step"],
                model=load_file(str(path / "model.safetensors")),
                optimizer=optimizer_state(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]),
                arrays=load_numpy(str(path / "arrays.safetensors")),
                joiner=(path / "joiner.arrow").read_bytes(),
                buffer=buffer,
                meta=meta,
            )
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc

    def _prune(self, newest: str) -> None:
        done = sorted(p for p in self.directory.glob("ckpt-*") if p.is_dir())
        pinned = None if self.pinned is None else f"ckpt-{self.pinned:09d}"
        for path in done[: -self.keep]:
            if path.name not in (newest, pinned):
                self._retire(path)

    def _retire(self, path: Path) -> None:
        """Remove a pruned checkpoint but its large files, kept in ``SPARE`` for the next checkpoint to be written
        over. Deleting gigabytes at once stalls every other fsync of the machine on a filesystem that discards freed
        blocks (ext4 mounted ``discard``, usual on cloud disks: a 3.3 GB file took 2.4-3.1 s to unlink and small
        fsyncs meanwhile up to 0.35-0.5 s); written over in place, its blocks are neither freed nor allocated."""
        spare = self.directory / SPARE
        with contextlib.suppress(OSError):
            spare.mkdir(exist_ok=True)
            for name in RECYCLED:
                if (path / name).exists():
                    os.replace(path / name, spare / name)
        shutil.rmtree(path, ignore_errors=True)


GROUP_FILE = "GROUP"


def group_step(checkpoint_dir: Path, world_size: int) -> int | None:
    """The last step whose checkpoint every worker of a group of ``world_size`` made durable (None: none
    yet). A group of another size cannot resume it: its workers read other partitions."""
    path = Path(checkpoint_dir) / GROUP_FILE
    try:
        record = orjson.loads(path.read_bytes())
        step, recorded = int(record["step"]), int(record["world_size"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc
    if recorded != world_size:
        raise CheckpointError(
            f"{path}: the checkpoints were written by {recorded} workers and cannot be resumed by {world_size} "
            "(each worker's state covers its own partitions); start with a new checkpoint directory or "
            f"--workers {recorded}"
        )
    return step


def restore_point(store: CheckpointStore, group_dir: Path | None, world_size: int) -> Checkpoint | None:
    """Alone (``group_dir`` None): the latest checkpoint. In a group: this worker's checkpoint of the last
    step that every worker made durable (``GROUP``), so that all restore the same step: the same weights, and
    offsets no worker committed past (a worker may hold a newer checkpoint that a peer never finished)."""
    if group_dir is None:
        return store.latest()
    step = group_step(group_dir, world_size)
    if step is None:
        return None
    store.pinned = step
    return store.load(step)


def write_group_step(checkpoint_dir: Path, step: int, world_size: int) -> None:
    write_atomic(Path(checkpoint_dir) / GROUP_FILE, orjson.dumps({"step": step, "world_size": world_size}))
