"""Hot images: the assembled image dirs of the checkpoints this host restored last, kept for the
next restore of the same checkpoint so it skips prefetch and materialize (gigabytes for a GPU image).

An image becomes hot only after CRIU restored from it once; at most `keep` stay, the least recently
used go first, never one a restore is reading. It trusts what it assembled: the dir is the restorer's
own (0700, under its work dir), and the whole set is dropped when the restorer starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class HotImages:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = root
        self.keep = keep
        self._used: dict[str, float] = {}  # checkpoint id -> last use (monotonic)
        self._readers: dict[str, int] = {}  # checkpoint id -> restores reading it now
        # What a previous run left may be half-renamed or from checkpoints gone from the catalog.
        self.dropped_at_start = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        shutil.rmtree(root, ignore_errors=True)
        if keep > 0:
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, 0o700)

    def path(self, checkpoint_id: str) -> Path:
        return self.root / checkpoint_id

    def get(self, checkpoint_id: str) -> Path | None:
        """The hot image dir of `checkpoint_id`, or None."""
        if self.keep <= 0 or checkpoint_id not in self._used:
            return None
        p = self.path(checkpoint_id)
        return p if p.is_dir() else None

    @contextlib.contextmanager
    def reading(self, checkpoint_id: str) -> Iterator[None]:
        """Eviction leaves the image alone while the block runs (CRIU is reading it)."""
        self._readers[checkpoint_id] = self._readers.get(checkpoint_id, 0) + 1
        self._used[checkpoint_id] = time.monotonic()
        try:
            yield
        finally:
            self._readers[checkpoint_id] -= 1
            if not self._readers[checkpoint_id]:
                del self._readers[checkpoint_id]

    def adopt(self, checkpoint_id: str, image_dir: Path) -> bool:
        """Keep `image_dir` (just restored from) as the hot image of `checkpoint_id`; False when off or
        another restore already made one (the caller then deletes its own). Evicts beyond `keep`."""
        if self.keep <= 0 or self.get(checkpoint_id) is not None:
            return False
        target = self.path(checkpoint_id)
        try:
            image_dir.rename(target)  # same filesystem: the work dir; atomic, no copy
        except OSError as e:
            log.warning("could not keep %s as the hot image of %s: %s", image_dir, checkpoint_id, e)
            return False
        self._used[checkpoint_id] = time.monotonic()
        for cid in self._evictable(checkpoint_id):
            self.drop(cid)
        return True

    def discard(self, checkpoint_id: str) -> None:
        """Drop the hot image unless a restore is reading it (then the last reader's failure will)."""
        if checkpoint_id not in self._readers:
            self.drop(checkpoint_id)

    def drop(self, checkpoint_id: str) -> None:
        self._used.pop(checkpoint_id, None)
        shutil.rmtree(self.path(checkpoint_id), ignore_errors=True)
        log.info("dropped the hot image of %s", checkpoint_id)

    def _evictable(self, newest: str) -> list[str]:
        """Least recently used first, beyond `keep`; never `newest` nor one being read."""
        by_age = sorted(self._used, key=lambda c: self._used[c])
        extra = len(by_age) - self.keep
        return [c for c in by_age if c != newest and c not in self._readers][: max(0, extra)]
