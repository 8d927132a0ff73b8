"""`attune train` end to end on a tiny model: every recipe kind lands in a store with a manifest
entry whose checksums verify, and the soup is the exact weighted sum of its parents."""
import json

import pytest
import yaml

from attune.paths import REWARD_DIR


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    recipe = {
        "name": "tiny", "base_model": str(tiny_model_dir), "safety_floor": 0.15,
        "train": {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "batch_size": 2,
                  "max_length": 128, "learning_rate": 1e-3},
        "pairs": {"max_pairs": 4},
        "onpolicy": {"samples": 2, "max_tokens": 8, "engine": "hf", "counsel_chat_prompts": 2},
        "sft": {"counsel_chat_examples": 0, "seed_best": True},
        "adapters": [
            {"id": "sft", "recipe": "sft"},
            {"id": "dpo-empathy", "recipe": "dpo", "primary": "empathy"},
            {"id": "dpo-safety", "recipe": "dpo", "primary": "safety"},
            {"id": "soup-es", "recipe": "soup", "parents": [{"id": "dpo-empathy", "weight": 0.3},
                                                           {"id": "dpo-safety", "weight": 0.7}]},
            {"id": "modpo-es", "recipe": "modpo", "primary": "empathy", "weights": {"empathy": 0.5, "safety": 0.5}},
            {"id": "joint-es", "recipe": "joint_dpo", "weights": {"empathy": 0.5, "safety": 0.5}},
        ]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.skipif(not (REWARD_DIR / "config.json").exists() and not any(REWARD_DIR.glob("*")),
                    reason="shipped reward model absent (run `attune reward train`)")
def test_tiny_recipe_end_to_end(tiny_recipe, tmp_path, monkeypatch, capsys):
    from adapters.merge import check_exact
    from adapters.registry import AdapterStore
    from alignment import pipeline

    monkeypatch.setattr(pipeline, "RUNS_DIR", tmp_path / "runs")
    store_dir = tmp_path / "store"
    summary = pipeline.run_recipe(str(tiny_recipe), out=store_dir, max_steps=1)
    store = AdapterStore(store_dir)
    assert store.ids() == sorted(["sft", "dpo-empathy", "dpo-safety", "soup-es", "modpo-es", "joint-es"])
    assert store.verify_all() == {}
    for i in store.ids():  # nothing but the adapter's own files (the resume marker lives beside the work folder)
        assert set(store.entry(i).files) == {"adapter_config.json", "adapter_model.safetensors"}, store.entry(i).files
    again = pipeline.run_recipe(str(tiny_recipe), out=store_dir, max_steps=1, only=["dpo-empathy", "soup-es"])
    assert again["adapters"]["dpo-empathy"] == summary["adapters"]["dpo-empathy"]  # reused by its recipe hash
    assert "reusing" in capsys.readouterr().out
    from adapters.signing import SignatureError, generate_key_pair, load_private_key

    private, public, _ = generate_key_pair(tmp_path / "keys" / "test.key")  # the operator signs what was trained
    store.sign(load_private_key(private))
    assert AdapterStore(store_dir, public).verify_all() == {}
    modpo = store.entry("modpo-es")
    assert modpo.recipe == "modpo" and modpo.primary_objective == "empathy"
    assert modpo.weights["empathy"] == pytest.approx(0.5) and len(modpo.data_hash) == 64
    assert summary["adapters"]["modpo-es"]["pairs"] > 0
    soup = store.entry("soup-es")
    assert soup.weights["safety"] == pytest.approx(0.7) and [p.id for p in soup.parents] == ["dpo-empathy", "dpo-safety"]
    assert check_exact(store.get("soup-es"), [(store.get("dpo-empathy"), 0.3), (store.get("dpo-safety"), 0.7)]) < 1e-3
    cached = list((tmp_path / "runs" / "tiny").glob("onpolicy-*.jsonl"))
    assert len(cached) == 1
    first = json.loads(cached[0].read_text().splitlines()[0])
    assert len(first["replies"]) == 2 and "scores" not in first  # scores are recomputed, never cached

    # An iteration: an adapter that starts from a trained one (init_from) trains and lands in a store as well.
    following = yaml.safe_load(tiny_recipe.read_text())
    following["adapters"] = [{"id": "modpo-next", "recipe": "modpo", "primary": "empathy",
                              "weights": {"empathy": 0.5, "safety": 0.5}, "init_from": str(store_dir / "modpo-es")}]
    (tmp_path / "next.yaml").write_text(yaml.safe_dump(following))
    capsys.readouterr()
    nxt = pipeline.run_recipe(str(tmp_path / "next.yaml"), out=tmp_path / "store2", max_steps=1)
    assert nxt["adapters"]["modpo-next"]["init_from"] == str(store_dir / "modpo-es")
    assert f"starting from {store_dir / 'modpo-es'}" in capsys.readouterr().out
    assert AdapterStore(tmp_path / "store2").verify_all() == {}

    from evals.evaluate import run_eval

    report = run_eval(str(tiny_recipe), out=tmp_path / "reports", limit=3, store_dir=store_dir,
                      max_tokens=6, prefer_vllm=False, cache_dir=tmp_path / "runs" / "eval", resamples=200)
    assert set(report["summary"]) == {"base", *store.ids()}
    assert report["summary"]["base"]["win_rate_vs_base"]["empathy"] == 0.5  # ties with itself count half
    for name in ("alignment.json", "alignment.md", "pareto.png", "steering.png", "eval_replies.jsonl"):
        assert (tmp_path / "reports" / name).stat().st_size > 0
    replies = [json.loads(line) for line in (tmp_path / "reports" / "eval_replies.jsonl").read_text().splitlines()]
    assert len(replies) == 3 and set(replies[0]["replies"]) == {"base", *store.ids()}
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "eval").glob("*.json")}
    assert len(cached) == 1 + len(store.ids())  # one cache file per model
    again = run_eval(str(tiny_recipe), out=tmp_path / "reports2", limit=3, store_dir=store_dir, max_tokens=6,
                     prefer_vllm=False, cache_dir=tmp_path / "runs" / "eval", resamples=200)
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # nothing regenerated
    assert again["summary"] == report["summary"]
    assert "judge" in AdapterStore(store_dir).entry("modpo-es").eval
    with pytest.raises(SignatureError, match="changed after it was signed"):  # eval scores are signed content too
        AdapterStore(store_dir, public).entry("modpo-es")


def test_win_rates_count_ties_as_half():
    import numpy as np

    from evals.evaluate import win_rates

    base = np.array([[1.0] * 6, [2.0] * 6, [3.0] * 6])
    ours = np.array([[2.0] * 6, [2.0] * 6, [1.0] * 6])  # win, tie, loss
    assert win_rates(ours, base).tolist() == [0.5] * 6
    assert win_rates(base + 1, base).tolist() == [1.0] * 6


def test_extra_prompts_exclude_every_corpus_prompt_of_every_split(counsel_chat_csv):
    from alignment import data, pipeline
    from alignment.corpus_data import load_prompts, resolve_texts

    corpus = set(resolve_texts(load_prompts(), str(counsel_chat_csv)).values())
    train = data.counsel_chat_questions(data.load_counsel_chat(str(counsel_chat_csv)), "train")
    assert corpus & set(train), "corpus counsel-chat prompts (test split included) come from the CSV's train split"
    rated = set(train[-3:])
    extras = pipeline.extra_prompts(10_000, str(counsel_chat_csv), rated)
    assert extras and not (set(extras) & (corpus | rated))
    assert set(extras) == set(train) - corpus - rated
    assert pipeline.extra_prompts(5, str(counsel_chat_csv), rated) == extras[:5]
    assert pipeline.extra_prompts(0, str(counsel_chat_csv), rated) == [] == pipeline.extra_prompts(5, None, rated)
