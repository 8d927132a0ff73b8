"""On-policy samples: k replies per prompt from the base model, cached as JSON lines (alignment.grid_data ranks
them with the reward model for prompts no rater saw)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alignment import prompts as P
from alignment.generate import GenerationSettings


def sample(prompts: list[str], generator, k: int, settings: GenerationSettings) -> list[dict]:
    """k sampled replies per prompt: [{prompt, replies}]."""
    samples = generator.generate([P.chat(p) for p in prompts], n=k, settings=settings)
    return [{"prompt": p, "replies": list(s)} for p, s in zip(prompts, samples)]


def save(samples: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in samples:
            f.write(json.dumps(d) + "\n")
    tmp.replace(path)


def load(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
