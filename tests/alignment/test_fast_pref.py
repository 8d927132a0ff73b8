"""The cached-layer preference trainer (alignment/fast_pref.py) on a tiny 4-layer Llama with LoRA on the top two:
the cached path gives the same reply log-probs as a full forward pass, the cache holds the base model's, and
training moves the model towards the chosen replies."""
from __future__ import annotations

import pytest
import torch

from alignment import fast_pref as F
from alignment.trainers import TrainArgs
from tests.conftest import make_tiny_llama

PAIRS = [
    ("I can't sleep before exams.", "That sounds exhausting. What keeps you up at night before them?", "Sleep."),
    ("My dog died last week.", "I'm so sorry. What was she like?", "Get another dog, it is only a pet anyway."),
    ("I argue with my sister a lot.", "That sounds painful. What do the arguments feel like?", "Ignore her."),
    ("Work is piling up.", "That's a lot to carry. What matters most to you here?", "Work harder then."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, base_model_dir):
    """Four layers, so that LoRA on the top two leaves two frozen layers to cache."""
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-4"), base_model_dir, layers=4))


def _conv(p, r):
    return [{"role": "user", "content": p}], [{"role": "assistant", "content": r}]


def _args(**kw):
    return TrainArgs(**{"lora_r": 4, "lora_alpha": 8, "layers_to_transform": [2, 3], "batch_size": 2,
                        "learning_rate": 5e-3, "beta": 0.5, "max_length": 128, **kw})


@pytest.fixture(scope="module")
def cache(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = [_conv(p, r) for p, c, x in PAIRS for r in (c, x)]
    return F.build_cache(model_dir, tok, seqs, layer=2, max_length=128, batch_size=3, log=lambda m: None)


def _pairs():
    return [{"chosen_key": F.key(*_conv(p, c)), "rejected_key": F.key(*_conv(p, x))} for p, c, x in PAIRS]


def test_the_cache_holds_the_base_models_reply_log_probs(model_dir, cache):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    keys = list(cache.encoded)
    assert len(keys) == 8 and len({cache.encoded[k].ids.shape[0] for k in keys}) > 1  # padding is exercised
    with torch.no_grad():
        full = F.full_logps(model, [cache.encoded[k] for k in keys])
    assert torch.allclose(full, torch.tensor([cache.ref_logp[k] for k in keys]), atol=1e-4)
    assert all(cache.hidden[k].shape == (cache.encoded[k].ids.shape[0], 64) for k in keys)


def test_cached_upper_layers_equal_a_full_forward_pass_with_lora(model_dir, cache):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           _args().lora_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA starts at B = 0: make it change the output
        keys = list(cache.encoded)
        cached = F.upper_logps(model, cache, keys)
        full = F.full_logps(model, [cache.encoded[k] for k in keys])
        base = torch.tensor([cache.ref_logp[k] for k in keys])
    assert torch.allclose(cached, full, atol=1e-4), (cached, full)
    assert (cached - base).abs().max() > 1e-2  # the LoRA weights matter, so equality above means something
    assert len(model.get_base_model().model.layers) == 4  # the upper-only view is undone


def test_training_prefers_the_chosen_replies_and_saves_a_peft_adapter(model_dir, cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    stats = F.train_adapter(model_dir, cache, _pairs(), _args(epochs=10), tmp_path / "a", log=lambda m: None)
    assert stats["steps"] == 20 and stats["pair_epochs"] == 40 and stats["skipped_pairs"] == 0
    assert stats["final_accuracy_last20"] > 0.9, stats
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(tmp_path / "a")).eval()
    with torch.no_grad():
        keys = [k for p in _pairs() for k in (p["chosen_key"], p["rejected_key"])]
        ratio = F.upper_logps(model, cache, keys) - torch.tensor([cache.ref_logp[k] for k in keys])
    assert (ratio[0::2] - ratio[1::2]).min() > 0, ratio  # every chosen reply gained on its rejected one


def test_the_margin_moves_the_policy_as_modpo_says(model_dir, cache, tmp_path):
    """MODPO's policy carries every objective: w_k r_k + w_-k . r_-k. A pair whose other objectives also favour the
    chosen reply (margin > 0) must end with a larger log-ratio gap than one with no margin, and one they disfavour
    (margin < 0) with a smaller one, after the same steps."""
    gaps = []
    for margin in (-2.0, 0.0, 2.0):
        pairs = [{**p, "margin": margin, "w_primary": 0.5} for p in _pairs()]
        F.train_adapter(model_dir, cache, pairs, _args(epochs=20), tmp_path / f"m{margin}", log=lambda m: None)
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                          str(tmp_path / f"m{margin}")).eval()
        with torch.no_grad():
            keys = [k for p in pairs for k in (p["chosen_key"], p["rejected_key"])]
            ratio = F.upper_logps(model, cache, keys) - torch.tensor([cache.ref_logp[k] for k in keys])
        gaps.append(float((ratio[0::2] - ratio[1::2]).mean()))
    assert gaps[0] < gaps[1] < gaps[2] and gaps[2] - gaps[0] > 0.1, gaps


def test_the_cache_round_trips_and_refuses_another_layer(model_dir, cache, tmp_path):
    path = tmp_path / "c.pt"
    cache.save(path)
    back = F.SequenceCache.load(path)
    assert back.ref_logp == cache.ref_logp and set(back.hidden) == set(cache.hidden)
    k = next(iter(cache.hidden))
    assert torch.equal(back.hidden[k], cache.hidden[k]) and back.encoded[k].start == cache.encoded[k].start
    with pytest.raises(ValueError, match="LoRA starts at 1"):
        F.train_adapter(model_dir, back, _pairs(), _args(layers_to_transform=[1, 2, 3]), tmp_path / "x")
    with pytest.raises(ValueError, match="cache built for layer 2"):
        F.build_cache(model_dir, None, [], layer=1, max_length=128, cache=back)


def test_an_adapter_can_start_from_a_trained_one(model_dir, cache, tmp_path):
    """init_from: the new adapter's LoRA weights start as the trained adapter's (so the policy starts where that
    one ended, with the base model still the reference), and an adapter of another shape is refused."""
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    F.train_adapter(model_dir, cache, _pairs(), _args(epochs=5), tmp_path / "first", log=lambda m: None)
    saved = load_file(str(tmp_path / "first" / "adapter_model.safetensors"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), _args().lora_config())
    assert F.load_initial_weights(model, tmp_path / "first", _args().lora_config()) == len(saved) == 8
    state = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.equal(state[k], v) for k, v in saved.items()), "the loaded weights are the saved ones"
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # a fresh adapter's B is zero

    logs: list[str] = []
    stats = F.train_adapter(model_dir, cache, _pairs(), _args(epochs=1), tmp_path / "next",
                            init_from=tmp_path / "first", log=logs.append)
    assert any("starting from" in m for m in logs)
    fresh = F.train_adapter(model_dir, cache, _pairs(), _args(epochs=1), tmp_path / "zero", log=lambda m: None)
    assert stats["train_loss"] < fresh["train_loss"], (stats, fresh)  # it starts where the first one ended

    with pytest.raises(ValueError, match="LoRA shape differs"):
        F.load_initial_weights(model, tmp_path / "first", _args(lora_r=8).lora_config())
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        F.load_initial_weights(model, tmp_path, _args().lora_config())


def _chosen_logps(model_dir, folder, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      str(folder)).eval()
    with torch.no_grad():
        return F.upper_logps(model, cache, [p["chosen_key"] for p in _pairs()])


def test_rpo_alpha_makes_the_chosen_replies_more_likely_than_the_preference_loss_alone(model_dir, cache, tmp_path):
    """rpo_alpha adds the chosen reply's per-token NLL: after the same steps the chosen replies' log-probs are higher
    than with the MODPO loss alone (which may lower both replies of a pair, as long as the gap grows)."""
    F.train_adapter(model_dir, cache, _pairs(), _args(epochs=5), tmp_path / "plain", log=lambda m: None)
    F.train_adapter(model_dir, cache, _pairs(), _args(epochs=5, rpo_alpha=4.0), tmp_path / "rpo", log=lambda m: None)
    plain, rpo = _chosen_logps(model_dir, tmp_path / "plain", cache), _chosen_logps(model_dir, tmp_path / "rpo", cache)
    assert (rpo > plain).all() and float((rpo - plain).mean()) > 0.5, (rpo, plain)


def test_chosen_nll_is_per_reply_token(cache):
    keys = [p["chosen_key"] for p in _pairs()]
    lengths = torch.tensor([float(len(cache.encoded[k].ids) - cache.encoded[k].start) for k in keys])
    logps = torch.tensor([cache.ref_logp[k] for k in keys])
    assert torch.allclose(F.chosen_nll(logps, cache, keys), -logps / lengths)
    assert len(set(lengths.tolist())) > 1  # replies of different lengths are normalised differently


def test_rpo_alpha_is_validated():
    with pytest.raises(ValueError, match="must be >= 0"):
        _args(rpo_alpha=-0.1)
    with pytest.raises(ValueError, match="needs trainer: cached"):
        _args(rpo_alpha=1.0, trainer="trl")
