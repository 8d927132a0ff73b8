"""evals/reply_cache.py: a rerun generates nothing, a changed adapter, prompt set or setting regenerates only what
it touches, and an interrupted run keeps the models it finished."""
from __future__ import annotations

import pytest

from alignment.generate import GenerationSettings
from evals import reply_cache

PROMPTS = ["I can't sleep.", "My boss yells at me."]
S = GenerationSettings(max_tokens=8, temperature=0.0, seed=0)


class Generator:
    def __init__(self, fail_on: str | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, name: str) -> list[str]:
        if name == self.fail_on:
            raise KeyboardInterrupt
        self.calls.append(name)
        return [f"{name} says {i}" for i in range(len(PROMPTS))]


def _run(tmp_path, gen, models=None, prompts=PROMPTS, settings=S):
    models = models or {"base": "base", "a": "sha-a", "b": "sha-b"}
    return reply_cache.cached_replies(models, prompts, "smollm2", "hf", settings, tmp_path, gen, log=lambda m: None)


def test_rerun_generates_nothing_and_returns_the_same_replies(tmp_path):
    first = _run(tmp_path, gen := Generator())
    assert gen.calls == ["base", "a", "b"]
    again = _run(tmp_path, gen2 := Generator())
    assert gen2.calls == [] and again == first


def test_only_what_changed_is_regenerated(tmp_path):
    _run(tmp_path, Generator())
    _run(tmp_path, gen := Generator(), models={"base": "base", "a": "sha-a-retrained", "b": "sha-b"})
    assert gen.calls == ["a"]
    _run(tmp_path, gen := Generator(), prompts=PROMPTS[::-1])
    assert gen.calls == ["base", "a", "b"]
    _run(tmp_path, gen := Generator(), settings=GenerationSettings(max_tokens=16, temperature=0.0, seed=0))
    assert gen.calls == ["base", "a", "b"]


def test_an_interrupted_run_keeps_the_models_it_finished(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, Generator(fail_on="b"))
    _run(tmp_path, gen := Generator())
    assert gen.calls == ["b"]


def test_a_corrupt_or_short_cache_file_is_regenerated(tmp_path):
    _run(tmp_path, Generator())
    key = reply_cache.cache_key("a", "sha-a", "smollm2", "hf", reply_cache.prompts_hash(PROMPTS), S)
    path = reply_cache.cache_path(tmp_path, key)
    path.write_text("{not json")
    _run(tmp_path, gen := Generator())
    assert gen.calls == ["a"]
    reply_cache.save(path, key, ["only one"])
    _run(tmp_path, gen := Generator())
    assert gen.calls == ["a"]


def test_adapter_checksum_follows_the_manifest_files():
    a = reply_cache.adapter_checksum({"adapter_model.safetensors": "11", "adapter_config.json": "22"})
    assert a == reply_cache.adapter_checksum({"adapter_config.json": "22", "adapter_model.safetensors": "11"})
    assert a != reply_cache.adapter_checksum({"adapter_model.safetensors": "12", "adapter_config.json": "22"})
