"""sha256 allowlists for adapter folders: what is hashed, and a check that names what differs.

Every regular file under the folder is hashed, hidden files included, nothing skipped; paths are
relative POSIX strings. A symlink or other non-regular entry is refused rather than followed.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Mapping

_CHUNK = 1 << 20


class IntegrityError(Exception):
    """An adapter folder that does not match its allowlist; `missing`, `extra`, `changed` list relative paths."""

    def __init__(self, folder: Path, missing=(), extra=(), changed=(), detail: str = ""):
        self.folder = Path(folder)
        self.missing, self.extra, self.changed = sorted(missing), sorted(extra), sorted(changed)
        parts = [f"{label}: {', '.join(paths)}" for label, paths in
                 (("changed", self.changed), ("missing", self.missing), ("extra", self.extra)) if paths]
        if detail:
            parts.append(detail)
        super().__init__(f"adapter folder {self.folder} failed its sha256 check ({'; '.join(parts)}); "
                         "restore the files from the training run, or re-register the folder if the "
                         "change is intended")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(folder: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `folder`, sorted; raise on anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IntegrityError(folder, detail="the folder does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode):
                continue
            rel = p.relative_to(folder).as_posix()
            if not stat.S_ISREG(mode):
                raise IntegrityError(folder, detail=f"{rel} is not a regular file (symlinks are refused)")
            out.append(rel)
    return sorted(out)


def hash_folder(folder: Path) -> dict[str, str]:
    """{relative path: sha256 hex} for every regular file under `folder`, in sorted order."""
    folder = Path(folder)
    return {rel: sha256_file(folder / rel) for rel in list_files(folder)}


def verify(folder: Path, expected: Mapping[str, str]) -> None:
    """Raise IntegrityError unless `folder` holds exactly the files in `expected`, byte for byte."""
    if not expected:
        raise IntegrityError(folder, detail="the allowlist is empty, so nothing can be trusted")
    present = set(list_files(folder))
    missing = set(expected) - present
    extra = present - set(expected)
    changed = [rel for rel in sorted(present & set(expected)) if sha256_file(Path(folder) / rel) != expected[rel]]
    if missing or extra or changed:
        raise IntegrityError(folder, missing=missing, extra=extra, changed=changed)
