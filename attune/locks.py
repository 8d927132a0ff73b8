"""Cross-process file locks (flock on a file in the temp folder), for writers that may run in
several processes at once: the adapter store's manifest and the router's merge builds."""
from __future__ import annotations

import contextlib
import hashlib
import tempfile
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: single-process locking only
    fcntl = None


@contextlib.contextmanager
def path_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the file at `path` (created if missing) until the block exits."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)


def file_lock(prefix: str, key: str) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock named by `prefix` and a hash of `key` (a file in the temp folder)."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return path_lock(Path(tempfile.gettempdir()) / f"{prefix}-{digest}.lock")
