"""The embedded chunk store: a local directory with the same key layout as S3.

Writes are atomic and durable (temp file, fsync, rename, fsync of the directory), so a reader
never sees a partial object. Blocking file I/O runs in threads.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from snapscale.shared.core.fsutil import read_into
from snapscale.shared.store.backend import ChunkStore, NotFoundError, ObjectInfo, TooBigError, check_key

TMP_DIR = ".tmp"


class LocalStore(ChunkStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"file://{root}"
        (root / TMP_DIR).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, self._path(key), data)

    def _put(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / TMP_DIR / f"{path.name}.{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise NotFoundError(key) from None

    async def get_into(self, key: str, buf: memoryview) -> int:
        """Read `key` into `buf` on a thread: no `bytes` made, no copy on the event loop (the
        default `get` + copy did both, ~8 MiB a chunk)."""
        try:
            return await asyncio.to_thread(_read_into, self._path(key), key, buf)
        except FileNotFoundError:
            raise NotFoundError(key) from None

    async def touch(self, key: str) -> bool:
        try:
            await asyncio.to_thread(os.utime, self._path(key))
        except FileNotFoundError:
            return False
        return True

    async def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        for info in await asyncio.to_thread(self._list, prefix):
            yield info

    def _list(self, prefix: str) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        # Walk only below the prefix's directory part: listing chunks never visits manifests.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        for dirpath, dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                dirs[:] = [d for d in dirs if d != TMP_DIR]
                rel_dir = ""
            for name in files:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # deleted while listing
                    out.append(ObjectInfo(key, st.st_size, st.st_mtime))
        out.sort(key=lambda o: o.key)
        return out

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, True)

    async def sweep_temp(self, older_than_s: float) -> int:
        return await asyncio.to_thread(self._sweep_temp, older_than_s, time.time())

    def _sweep_temp(self, older_than_s: float, now: float) -> int:
        # Young ones may belong to a writer still running: only old ones are a crash's leftovers.
        n = 0
        for p in (self.root / TMP_DIR).iterdir():
            try:
                if now - p.stat().st_mtime > older_than_s:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n


def _read_into(path: Path, key: str, buf: memoryview) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size > len(buf):
            raise TooBigError(f"{key}: {size} bytes, more than the {len(buf)} expected")
        with buf[:size] as part:
            return read_into(fd, part)  # short if it shrank meanwhile: the hash check catches it
    finally:
        os.close(fd)
