"""Replies `attune eval` generated, cached per model under runs/eval/: one file per (model name, adapter checksum
from the store manifest or 'base', base model, engine, prompts, generation settings). A rerun, or an eval
interrupted after some models, generates only the models whose key changed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from alignment.generate import GenerationSettings


def adapter_checksum(files: dict[str, str]) -> str:
    """One sha256 over an adapter's manifest allowlist (relative path -> sha256 of each file)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def text_checksum(system_prompt: str) -> str:
    """The checksum of base under another system prompt: its text's sha256, so a changed prompt is a new model."""
    return "system:" + hashlib.sha256(system_prompt.encode()).hexdigest()


def prompts_hash(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def cache_key(model: str, checksum: str, base_model: str, engine: str, prompts_sha: str,
              settings: GenerationSettings) -> dict:
    return {"model": model, "checksum": checksum, "base_model": base_model, "engine": engine,
            "prompts_sha256": prompts_sha, "settings": asdict(settings)}


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['model']}-{digest}.json"


def load(path: Path, key: dict, n: int) -> list[str] | None:
    """The cached replies when the file exists, holds this exact key and one reply per prompt; else None."""
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    replies = row.get("replies")
    return replies if row.get("key") == key and isinstance(replies, list) and len(replies) == n else None


def save(path: Path, key: dict, replies: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "replies": replies}, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: an interrupted write leaves the old file or none, never half a file


def cached_replies(models: dict[str, str], prompts: list[str], base_model: str, engine: str,
                   settings: GenerationSettings, cache_dir: Path,
                   generate: Callable[[str], list[str]], log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """{model: replies} for `models` ({name: checksum}); `generate(name)` is called only for models not cached,
    and each result is saved as soon as it exists."""
    sha = prompts_hash(prompts)
    out: dict[str, list[str]] = {}
    for name, checksum in models.items():
        key = cache_key(name, checksum, base_model, engine, sha, settings)
        path = cache_path(cache_dir, key)
        replies = load(path, key, len(prompts))
        if replies is None:
            replies = generate(name)
            if len(replies) != len(prompts):
                raise RuntimeError(f"{name}: {len(replies)} replies for {len(prompts)} prompts")
            save(path, key, replies)
        else:
            log(f"{name}: cached replies ({path.name})")
        out[name] = replies
    return out
