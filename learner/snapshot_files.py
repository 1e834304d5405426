"""Where a snapshot store keeps its files: a local directory, or a folder of any ``pyarrow.fs`` filesystem.

Both give :class:`~learner.snapshots.SnapshotStore` the same few operations on flat names in one folder, and
each write is whole or absent, never half there:

- :class:`LocalFiles` writes a file to a temporary name, fsyncs it, renames it into place and fsyncs the
  directory (:func:`write_atomic`), so a reader, or a restart after a power cut, sees all of it or none. Writers
  (the trainer publishing, ``moestream snapshots rollback``) take turns through an ``flock`` on ``.lock``.
- :class:`ArrowFiles` writes a file as one object through ``pyarrow.fs`` (``s3://``, ``gs://``, ``hdfs://``, ...):
  an object store shows an object only once it is whole, so there is no temporary name to rename (S3 and GCS
  have no rename). Object stores have no lock either, so **one writer per store**: the trainer's publishing
  rank, and no ``rollback`` against a remote store while it publishes.

A temporary name starts with ``.`` and holds ``.tmp-``; the store removes those a killed writer left
(:func:`is_leftover_tmp`) when it next publishes, under its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs


Payload = bytes | Iterable[memoryview]
"""A file's bytes, whole or as the parts it is written from one after another (no joined copy; an iterator of parts
is read once, as it is written)."""


SYNC_EVERY_BYTES = 16 * 2**20
"""A file larger than this is synced every so many bytes while it is written. Written whole and synced at the end,
a base of gigabytes leaves that much waiting for the disk, and on ext4 (data=ordered) every other fsync meanwhile
waits behind it: a delta's write beside a 1.8 GB base took up to 1.8 s; synced every 16 MiB, up to 61 ms, the base
no slower (docs/telemetry.md)."""


def _parts(payload: Payload) -> Iterable[bytes | memoryview]:
    return [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload


DIRECT_ALIGN = 4096
"""What a write around the page cache (``O_DIRECT``) must be aligned to: memory, length and file offset."""


def write_atomic(path: Path, payload: Payload, direct: bool = False, over: Path | None = None) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory: readers see all of it or none.

    ``direct``: around the page cache (``O_DIRECT``) where the filesystem takes it, else as usual; for files of
    gigabytes that nothing reads soon (checkpoints). A buffered write costs the writing thread the copy into the page
    cache and the machine the dirty pages' writeback besides: 2 GB cost the writing thread 3.1-4.3 s of CPU buffered,
    0.57 s direct, at the same disk speed (docs/learner.md). ``over``: a file no longer needed (an older
    checkpoint's), written over in place rather than a new one allocated, where it exists and the write is direct
    (as databases recycle their log files): its blocks are neither freed nor allocated again."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if direct and over is not None and over.exists():
            os.replace(over, tmp)
        if not (direct and _write_direct(tmp, payload)):
            _write_buffered(tmp, payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk still lets a file be removed; a read-only one made none
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_buffered(path: Path, payload: Payload) -> None:
    with open(path, "wb") as f:
        unsynced = 0
        for part in _parts(payload):
            view = memoryview(part).cast("B")
            for start in range(0, len(view), SYNC_EVERY_BYTES):
                chunk = view[start:start + SYNC_EVERY_BYTES]
                f.write(chunk)
                unsynced += len(chunk)
                if unsynced >= SYNC_EVERY_BYTES:  # a large file goes to disk as it is written, not all at the end
                    f.flush()
                    os.fdatasync(f.fileno())
                    unsynced = 0
        f.flush()
        os.fsync(f.fileno())


def _write_direct(path: Path, payload: Payload) -> bool:
    """Write ``payload`` to ``path`` (over what a file there holds) with ``O_DIRECT`` through an aligned buffer of
    ``SYNC_EVERY_BYTES`` (the last block padded, then the file cut to its size), synced as it goes; False, having
    written nothing, where the filesystem or the OS has no ``O_DIRECT`` (tmpfs, macOS): the caller writes it
    buffered, which truncates what is there."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)  # not truncated: a file there is written over
    if flags == os.O_WRONLY | os.O_CREAT:
        return False
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    aligned = mmap.mmap(-1, SYNC_EVERY_BYTES)  # page-aligned memory
    staged = np.frombuffer(aligned, np.uint8)
    try:
        filled = size = 0
        for part in _parts(payload):
            data = np.frombuffer(memoryview(part).cast("B"), np.uint8)
            while len(data):
                n = min(len(data), len(staged) - filled)
                np.copyto(staged[filled:filled + n], data[:n])  # numpy lets the interpreter's lock go for this
                filled, data = filled + n, data[n:]
                if filled == len(staged):
                    _write_all(fd, staged)
                    os.fdatasync(fd)
                    size, filled = size + filled, 0
        if filled:
            padded = -(-filled // DIRECT_ALIGN) * DIRECT_ALIGN
            staged[filled:padded] = 0
            _write_all(fd, staged[:padded])
            size += filled
        os.ftruncate(fd, size)  # the padding, and what a longer file written over held past the end
        os.fsync(fd)
    finally:
        os.close(fd)
        del staged
        with contextlib.suppress(BufferError):  # a view still held by a traceback: freed with it
            aligned.close()
    return True


def _write_all(fd: int, data: np.ndarray) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_leftover_tmp(name: str) -> bool:
    """A temporary name of :func:`write_atomic` (a writer killed before its rename leaves one)."""
    return name.startswith(".") and ".tmp-" in name


class LocalFiles:
    """A local directory (created if missing): crash-safe renames, and an ``flock`` for writers."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.uri = self.directory.absolute().as_uri()
        self.location: Path | str = self.directory

    def names(self) -> list[str]:
        return [entry.name for entry in os.scandir(self.directory)]

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def size(self, name: str) -> int | None:
        """Bytes of ``name``, or None when there is no such file."""
        try:
            return (self.directory / name).stat().st_size
        except FileNotFoundError:
            return None

    def write(self, name: str, payload: Payload) -> None:
        write_atomic(self.directory / name, payload)

    def remove(self, name: str) -> None:
        (self.directory / name).unlink(missing_ok=True)

    def move(self, name: str, to: str) -> None:
        """Rename ``name`` to ``to`` (replacing it) and fsync the directory: one metadata write, whatever the size."""
        os.replace(self.directory / name, self.directory / to)
        _fsync_dir(self.directory)

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The writers' turn: opens ``.lock`` now (an ``OSError`` here means the directory is unwritable) and
        holds an exclusive ``flock`` on it inside the ``with``."""
        handle = open(self.directory / ".lock", "a+b")
        return _flocked(handle)


@contextlib.contextmanager
def _flocked(handle) -> Iterator[None]:
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class ArrowFiles:
    """A folder of a ``pyarrow.fs`` filesystem; each file is written as one whole object."""

    def __init__(self, filesystem: pafs.FileSystem, path: str, uri: str) -> None:
        self.filesystem, self.path, self.uri = filesystem, path.rstrip("/"), uri
        self.location: Path | str = uri
        with contextlib.suppress(OSError):  # object stores need no folder; a reader may not be allowed to make one
            filesystem.create_dir(self.path, recursive=True)

    def _at(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def names(self) -> list[str]:
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return [info.base_name for info in self.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]

    def read(self, name: str) -> bytes:
        with self.filesystem.open_input_stream(self._at(name), compression=None) as stream:
            return stream.read()

    def size(self, name: str) -> int | None:
        info = self.filesystem.get_file_info(self._at(name))
        return info.size if info.type == pafs.FileType.File else None

    def write(self, name: str, payload: Payload) -> None:
        with self.filesystem.open_output_stream(self._at(name), compression=None) as stream:
            for part in _parts(payload):
                stream.write(part)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_file(self._at(name))

    def move(self, name: str, to: str) -> None:
        """``pyarrow.fs`` move: a rename where the filesystem has one; on S3 and GCS a copy then a delete."""
        self.filesystem.move(self._at(name), self._at(to))

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """No lock exists on an object store: one writer per store (see the module docstring)."""
        return contextlib.nullcontext()


def open_files(location: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> LocalFiles | ArrowFiles:
    """The files at ``location``: a local path (``str`` or ``Path``), a URI ``pyarrow.fs.FileSystem.from_uri``
    knows (``file://`` is local), or a path inside ``filesystem`` when one is given."""
    if filesystem is None and isinstance(location, str) and "://" in location:
        filesystem, path = pafs.FileSystem.from_uri(location)
        uri = location
    else:
        path = os.fspath(location)
        uri = f"{filesystem.type_name}://{path}" if filesystem is not None else ""
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return LocalFiles(Path(path))
    return ArrowFiles(filesystem, path, uri)


__all__ = ["ArrowFiles", "LocalFiles", "is_leftover_tmp", "open_files", "write_atomic"]
