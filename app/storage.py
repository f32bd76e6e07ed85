"""Artifact storage: a content-addressed directory that several machines may share.

Layout under the storage directory (`LEGO_STORAGE_DIR`):

    objects/<sha256[:2]>/<sha256>   immutable artifacts, named by their content
    tmp/                            files being written; moved into objects/ when complete
    work/                           scratch space of jobs (unpacked datasets, ...)

Every write goes to a temp file in `tmp/` (same file system), is fsynced, then
`os.replace`d to its final name, so a reader never sees a partial artifact and a
crash leaves only a temp file behind. Storing the same content twice is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"upload is larger than the limit of {limit} bytes")
        self.limit = limit


class ArtifactMissing(Exception):
    pass


class Storage:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.work = self.root / "work"
        for d in (self.objects, self.tmp, self.work):
            d.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths
    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.objects / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def require(self, sha256: str) -> Path:
        p = self.path(sha256)
        if not p.is_file():
            raise ArtifactMissing(f"artifact {sha256} is missing from {self.objects}")
        return p

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def temp_path(self, suffix: str = "") -> Iterator[Path]:
        """A fresh path in tmp/ that is removed on exit unless it was stored."""
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix, prefix="w-")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def put_stream(self, src: BinaryIO, max_bytes: int | None = None, suffix: str = "") -> Path:
        """Copy a stream into a temp file (counting bytes); the caller stores or drops it.

        Returns the temp path; raises UploadTooLarge (and removes the file) when the
        stream is longer than `max_bytes`.
        """
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix, prefix="u-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    out.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def store_file(self, path: Path) -> tuple[str, int]:
        """Store a complete file; returns (sha256, size).

        A file in tmp/ is moved (it is gone afterwards); any other file is copied.
        """
        sha, size = file_sha256(path)
        dest = self.path(sha)
        own = path.parent == self.tmp
        if dest.is_file():
            if own:
                path.unlink(missing_ok=True)
            # Fresh again: the orphan sweep leaves recent objects alone, and a row is
            # about to reference this one.
            with contextlib.suppress(OSError):
                os.utime(dest)
            return sha, size
        dest.parent.mkdir(parents=True, exist_ok=True)
        if own:
            _fsync_file(path)
            os.replace(path, dest)
        else:
            with self.temp_path() as t:
                shutil.copyfile(path, t)
                _fsync_file(t)
                os.replace(t, dest)
        _fsync_dir(dest.parent)
        return sha, size

    def put_bytes(self, data: bytes) -> str:
        with self.temp_path() as t:
            t.write_bytes(data)
            return self.store_file(t)[0]

    def delete(self, sha256: str) -> None:
        """Remove an artifact (the caller checked that nothing references it)."""
        self.path(sha256).unlink(missing_ok=True)
        # Derived files: named links (work/named/<sha>.<suffix>) and decoded-dataset
        # caches (work/cache/**/<sha>-<key>.pt).
        for p in [*self.work.glob(f"named/{sha256}*"), *self.work.glob(f"cache/**/{sha256}-*")]:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ scratch
    def work_dir(self, name: str) -> Path:
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temp files left by crashed writers; returns how many."""
        cutoff = time.time() - older_than_s
        n = 0
        for p in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_mtime < cutoff:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
                    n += 1
        return n

    def check_writable(self) -> None:
        """Raise OSError unless a file can be written, synced and removed."""
        with self.temp_path(".probe") as t, open(t, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())

    def free_bytes(self) -> int:
        """Bytes free for writing on the artifact disk."""
        return shutil.disk_usage(self.root).free

    def listing(self) -> set[str]:
        """Every object name (for tests and audits)."""
        return {p.name for p in self.objects.glob("*/*") if p.is_file()}


def file_sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
