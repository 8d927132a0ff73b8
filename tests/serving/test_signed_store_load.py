"""Serving refuses a store whose manifest is not signed by the configured public key, at every place that loads
from the store: the LLM replica (before vLLM starts), the ingress (routing reads the manifest) and the scorer's
reward and crisis folders. The attack: change an adapter, re-hash it in the manifest, keep the old signature."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.integrity import sha256_file
from adapters.registry import AdapterStore
from adapters.signing import SignatureError, generate_key_pair, load_private_key
from alignment.objectives import OBJECTIVES
from serving.config import ServeConfig


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    private, public, _ = generate_key_pair(tmp_path_factory.mktemp("keys") / "test.key")
    return private, public


@pytest.fixture
def store(tmp_path, keys) -> AdapterStore:
    """One adapter and a reward folder, registered and signed with the test key."""
    store = AdapterStore(tmp_path / "store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                         "target_modules": ["q_proj"]}))
    (src / "adapter_model.safetensors").write_bytes(b"weights" * 8)
    store.add(src, {"id": "warm", "recipe": "modpo", "weights": {o: 1 / 6 for o in OBJECTIVES},
                    "base_model": "test", "data_hash": "sha256:test"})
    (store.root / "reward").mkdir()
    (store.root / "reward" / "config.json").write_text("{}")
    store.register_scorer("reward")
    store.sign(load_private_key(keys[0]))
    return store


def tamper(store: AdapterStore, folder: str, rel: str) -> None:
    """Change a file and put its new sha256 in the manifest, as someone with write access to the store can."""
    path = store.root / folder / rel
    path.write_bytes(path.read_bytes() + b" backdoor")
    data = json.loads(store.manifest_path.read_text())
    files = (next(a for a in data["adapters"] if a["id"] == folder)["files"] if folder != "reward"
             else data["scorers"]["reward"])
    files[rel] = sha256_file(path)
    store.manifest_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def config(store: AdapterStore, public: Path | None, tmp_path: Path, **over) -> dict:
    return ServeConfig(store_dir=store.root, adapter_public_key=public, data_dir=tmp_path / "data",
                       **over).model_dump(mode="json")


def test_the_config_trusts_the_shipped_public_key_unless_told_otherwise():
    from attune.paths import ADAPTER_PUBLIC_KEY
    from serving.app import AppArgs, load_config

    assert ServeConfig().adapter_public_key == ADAPTER_PUBLIC_KEY
    assert load_config(AppArgs(), environ={"ATTUNE_ADAPTER_PUBLIC_KEY": "/etc/attune/op.pub"}).adapter_public_key \
        == Path("/etc/attune/op.pub")
    assert load_config(AppArgs(), environ={"ATTUNE_ADAPTER_PUBLIC_KEY": "none"}).adapter_public_key is None


def test_the_llm_replica_refuses_a_tampered_store_before_starting_vllm(store, keys, tmp_path):
    from serving.app import LLMServer

    tamper(store, "warm", "adapter_model.safetensors")
    assert store.get("warm"), "the re-hashed manifest fools the sha256 check"
    with pytest.raises(SignatureError, match="changed after it was signed"):
        LLMServer.func_or_class(config(store, keys[1], tmp_path))


def test_the_llm_replica_refuses_an_unsigned_store_and_a_missing_key(store, keys, tmp_path):
    from serving.app import LLMServer

    data = json.loads(store.manifest_path.read_text())
    del data["signature"]
    store.manifest_path.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="is not signed"):
        LLMServer.func_or_class(config(store, keys[1], tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        LLMServer.func_or_class(config(store, tmp_path / "nowhere.pub", tmp_path))


def test_the_ingress_refuses_a_tampered_store(store, keys, tmp_path):
    """With merge_policy on too: runtime merges go to the merge cache, so the policy no longer conflicts with a signed
    store (tests/serving/test_merge_serving.py), but the store itself is still checked."""
    from serving.app import AttuneIngress

    cls = AttuneIngress.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper, whose __init__ is async

    def start(cfg: dict) -> None:
        cls.__init__(object.__new__(cls), cfg, None, None)

    tamper(store, "warm", "adapter_model.safetensors")
    with pytest.raises(SignatureError, match="changed after it was signed"):
        start(config(store, keys[1], tmp_path))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        start(config(store, keys[1], tmp_path, merge_policy=True))


def test_the_scorer_refuses_a_tampered_reward_folder_in_a_signed_store(store, keys):
    from serving.scorer import Scorer

    tamper(store, "reward", "config.json")
    with pytest.raises(SignatureError, match="changed after it was signed"):
        Scorer.load(store.root / "reward", public_key=keys[1])
    shutil.rmtree(store.root / "warm")
    with pytest.raises(SignatureError, match="changed after it was signed"):
        Scorer.load(store.root / "reward", crisis_path=store.root / "reward", public_key=keys[1])
