"""One real Attune application per test session: Ray (no dashboard, 2 CPUs), vLLM on SmolLM2 with the shipped adapters
(else two random LoRAs with different B), the shipped reward model (else one trained in seconds), SQLite in a temporary
folder, test hooks on, on a free loopback port."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from alignment.objectives import OBJECTIVES

RANDOM_ADAPTERS = {
    "test-warm": {"empathy": 0.55, "safety": 0.15, "active_listening": 0.1, "self_motivated_change": 0.05,
                  "trust_rapport": 0.1, "patient_autonomy": 0.05},
    "test-safe": {"empathy": 0.1, "safety": 0.6, "active_listening": 0.1, "self_motivated_change": 0.05,
                  "trust_rapport": 0.1, "patient_autonomy": 0.05},
}


@dataclass
class Server:
    url: str
    api_key: str
    operator_key: str
    data_dir: Path
    adapters: dict[str, dict[str, float]]
    startup_seconds: float
    settings: dict
    """The ServeConfig settings the app was started with (a test that redeploys restores them)."""

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store(tmp: Path, base: Path) -> Path:
    from adapters.matching import ROUTABLE_RECIPES
    from adapters.registry import AdapterStore
    from attune.paths import STORE_DIR

    shipped = AdapterStore(STORE_DIR)
    if len([a for a in shipped.list() if a.recipe in ROUTABLE_RECIPES]) >= 2 and not shipped.verify_all():
        return STORE_DIR  # signed with the operator's key; serving checks it with the shipped public key
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = AdapterStore(tmp / "store")
    for seed, (adapter_id, weights) in enumerate(RANDOM_ADAPTERS.items(), 1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        folder = tmp / f"lora-{adapter_id}"
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False)).save_pretrained(folder)
        store.add(folder, {"id": adapter_id, "recipe": "modpo", "weights": weights, "base_model": "smollm2-135m-instruct",
                           "data_hash": "random-test-adapter", "primary_objective": max(weights, key=weights.get)})
    return store.root


def _sign(store: Path, reward: Path, tmp: Path) -> tuple[Path, Path]:
    """A store made here is signed with a test key made here: (its public key, the reward folder to serve). A shipped
    reward model moves into it, as one store has one signing key."""
    import shutil

    from adapters.registry import AdapterStore
    from adapters.signing import generate_key_pair, load_private_key
    from attune.paths import STORE_DIR

    s = AdapterStore(store)
    if reward.parent.resolve() == STORE_DIR.resolve():
        for name in ("reward", "crisis"):
            if (STORE_DIR / name).is_dir():
                shutil.copytree(STORE_DIR / name, store / name)
                s.register_scorer(name)
        reward = store / "reward"
    private, public, _ = generate_key_pair(tmp / "keys" / "test-signing.key")
    s.sign(load_private_key(private))
    return public, reward


def _reward(tmp: Path) -> Path:
    from alignment.reward import RewardModel, RewardConfig
    from alignment.reward_training import TrainArgs, train_reward_model
    from attune.paths import REWARD_DIR

    try:
        RewardModel.load(REWARD_DIR)
        return REWARD_DIR
    except (FileNotFoundError, ValueError, OSError, KeyError):
        pass
    from alignment.data import load_seed, split_examples

    seed = load_seed()
    rm = train_reward_model(split_examples(seed, "train"), split_examples(seed, "val"),
                            config=RewardConfig(lora_rank=0), args=TrainArgs(epochs=4, crisis_epochs=3),
                            progress=False)
    rm.save(tmp / "reward")
    return tmp / "reward"


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    from alignment.basemodel import prepare
    from attune.paths import STORE_DIR
    from serving import app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[app.TEST_HOOKS_ENV] = "1"
    tmp = tmp_path_factory.mktemp("attune-serve")
    base = prepare()
    store, reward = _store(tmp, base), _reward(tmp)
    public_key = None
    if store != STORE_DIR:
        public_key, reward = _sign(store, reward, tmp)
    # The calibrated gate, as shipped (no safety_threshold override): real replies must pass it, and injected faults
    # force the unsafe path (test_serve). With random adapters (no shipped store) their text may be replaced.
    # Admission is small (4 generating, 8 waiting) so that test_overload's burst of 60 is far beyond it.
    settings = {
        "store_dir": str(store), "reward_dir": str(reward), "data_dir": str(tmp / "data"),
        **({"adapter_public_key": str(public_key)} if public_key else {}),
        "limits": {"max_body_bytes": 16384, "max_tokens_cap": 64, "default_max_tokens": 24, "requests_per_minute": 20,
                   "max_in_flight": 4, "max_queue": 8, "queue_timeout_s": 120},
        "engine": {"max_loras": 4, "max_lora_rank": 16, "max_model_len": 1024, "cpu_memory_fraction": 0.02},
    }
    started = time.perf_counter()
    try:
        url = app.start_local({"settings": settings}, port=_free_port(), num_cpus=2)
        app.wait_ready(url, timeout_s=900)
        seconds = time.perf_counter() - started
        print(f"\nAttune ready at {url} in {seconds:.1f} s (store {store}, reward model {reward})")
        from adapters.matching import ROUTABLE_RECIPES
        from adapters.registry import AdapterStore

        adapters = {a.id: a.weights for a in AdapterStore(store).list() if a.recipe in ROUTABLE_RECIPES}
        assert set(next(iter(adapters.values()))) == set(OBJECTIVES)
        yield Server(url, (tmp / "data" / "api_key").read_text().strip(),
                     (tmp / "data" / "operator_key").read_text().strip(), tmp / "data", adapters, seconds, settings)
    finally:
        app.stop_local()
        os.environ.pop(app.TEST_HOOKS_ENV, None)
