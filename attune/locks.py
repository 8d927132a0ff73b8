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
def file_lock(prefix: str, key: str) -> Iterator[None]:
    """Hold an exclusive lock named by `prefix` and a hash of `key` until the block exits."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"{prefix}-{digest}.lock", "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_UN)
