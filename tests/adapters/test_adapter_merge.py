"""Exact weighted LoRA merges: merged delta W == 0.3 dW1 + 0.7 dW2 per module, checked against PEFT itself."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from adapters.merge import MergeError, check_exact, delta_weights, merge_adapters
from lora_helpers import make_lora, read_config

W1, W2 = 0.3, 0.7


def peft_deltas(base, folders: dict[str, object]) -> tuple[object, dict[str, dict[str, torch.Tensor]]]:
    """Load `folders` as named adapters with PEFT; {adapter: {module: delta}} from PEFT's get_delta_weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(folders)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model, collect(model, names)


def collect(model, names):
    from peft.tuners.lora import LoraLayer

    out = {n: {} for n in names}
    for key, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            for n in names:
                if n in module.lora_A:
                    out[n][key] = module.get_delta_weight(n).detach()
    return out


def assert_close_all(got, want, atol=1e-5):
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=atol, rtol=1e-5, msg=lambda s: f"{m}: {s}")


def test_delta_weights_match_peft(tiny_llama, lora_a, lora_b):
    _, ref = peft_deltas(tiny_llama, {"a": lora_a, "b": lora_b})
    assert_close_all(delta_weights(lora_a), ref["a"], atol=1e-6)
    assert_close_all(delta_weights(lora_b), ref["b"], atol=1e-6)


def test_cat_merge_is_exact(tiny_llama, lora_a, lora_b, tmp_path):
    out = merge_adapters(tiny_llama, [(lora_a, W1), (lora_b, W2)], tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = read_config(out)
    assert cfg["r"] == 4 + 8 and cfg["lora_alpha"] == cfg["r"] and cfg["use_rslora"] is False
    assert cfg["target_modules"] == ["gate_proj", "k_proj", "o_proj", "q_proj", "v_proj"]

    _, ref = peft_deltas(tiny_llama, {"a": lora_a, "b": lora_b, "m": out})
    want = {m: W1 * ref["a"].get(m, 0) + W2 * ref["b"].get(m, 0) for m in ref["a"].keys() | ref["b"].keys()}
    assert_close_all(ref["m"], want)
    assert_close_all(delta_weights(out), want)
    assert any(m not in ref["a"] for m in want) and any(m not in ref["b"] for m in want)
    assert check_exact(out, [(lora_a, W1), (lora_b, W2)]) < 1e-5
    with pytest.raises(MergeError, match="differs from the weighted sum"):
        check_exact(out, [(lora_a, W1), (lora_b, W2 * 1.001)])
    with pytest.raises(MergeError, match="modules differ"):
        check_exact(out, [(lora_a, 1.0), (lora_a, 0.0)])


def test_linear_is_not_exact(tiny_llama, lora_b, tmp_path):
    """PEFT's `linear` scales A and B by sqrt(w s) and sums each: B@A gains cross terms B_i A_j."""
    lora_c = make_lora(tiny_llama, tmp_path / "c", 3, r=8, lora_alpha=4,
                       target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"])
    model, ref = peft_deltas(tiny_llama, {"b": lora_b, "c": lora_c})
    model.add_weighted_adapter(["b", "c"], [W1, W2], "lin", combination_type="linear")
    model.add_weighted_adapter(["b", "c"], [W1, W2], "cat", combination_type="cat")
    merged = collect(model, ["lin", "cat"])
    want = {m: W1 * ref["b"][m] + W2 * ref["c"][m] for m in ref["b"]}
    assert_close_all(merged["cat"], want)
    worst = max((merged["lin"][m] - want[m]).abs().max().item() for m in want)
    scale = max(want[m].abs().max().item() for m in want)
    assert worst > 0.05 * scale, f"linear unexpectedly exact: max error {worst} vs delta scale {scale}"


def test_peft_cat_keeps_first_parents_rslora(tiny_llama, lora_a, lora_b):
    """Why merge_adapters saves use_rslora=False: PEFT's merged adapter inherits it and scales by sqrt(r)."""
    model, ref = peft_deltas(tiny_llama, {"a": lora_a, "b": lora_b})
    model.add_weighted_adapter(["a", "b"], [W1, W2], "cat", combination_type="cat")
    got = collect(model, ["cat"])["cat"]
    want = {m: W1 * ref["a"].get(m, 0) + W2 * ref["b"].get(m, 0) for m in got}
    assert_close_all(got, {m: d * (4 + 8) ** 0.5 for m, d in want.items()}, atol=1e-4)


def test_refuses_what_cannot_be_exact(tiny_llama, lora_a, lora_b, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(lora_a, dora)
    cfg = read_config(dora) | {"use_dora": True}
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="use_dora"):
        merge_adapters(tiny_llama, [(dora, W1), (lora_b, W2)], tmp_path / "m1")
    with pytest.raises(ValueError, match="at least two"):
        merge_adapters(tiny_llama, [(lora_a, 1.0)], tmp_path / "m2")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(FileExistsError):
        merge_adapters(tiny_llama, [(lora_a, W1), (lora_b, W2)], tmp_path / "busy")


@pytest.mark.slow
def test_merge_benchmark_smollm2(base_model_dir, tmp_path):
    """Two random r8 adapters on all seven projections of SmolLM2-135M; prints the merge time."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    a = make_lora(base_model_dir, tmp_path / "a", 1, r=8, lora_alpha=16, target_modules=targets)
    b = make_lora(base_model_dir, tmp_path / "b", 2, r=8, lora_alpha=16, target_modules=targets)
    t0 = time.perf_counter()
    out = merge_adapters(base_model_dir, [(a, W1), (b, W2)], tmp_path / "m", verify=False)
    t1 = time.perf_counter()
    merge_adapters(base_model_dir, [(a, W1), (b, W2)], tmp_path / "m2", verify=True)
    t2 = time.perf_counter()
    print(f"\nmerge two r8 adapters on SmolLM2-135M: {t1 - t0:.2f} s (+ exactness check: {t2 - t1:.2f} s total)")
    assert read_config(out)["r"] == 16


def test_extrapolated_store_pushes_each_adapter_away_from_the_anchor(tiny_llama, lora_a, lora_b, tmp_path, capsys):
    """`attune adapters extrapolate`: (1 + lam) dW_k - lam dW_anchor, exact, under k's id and weights, as a merge
    that names both parents; never over an existing store."""
    from adapters.registry import AdapterStore
    from attune.adapter_commands import adapters_extrapolate
    from evals.tune import TUNED_RECIPES
    from lora_helpers import BALANCED, entry

    src = AdapterStore(tmp_path / "store")
    emph = {**{o: 0.1 for o in BALANCED}, "empathy": 0.5}
    src.add(lora_a, entry("modpo-empathy", weights=emph, primary_objective="empathy", base_model=str(tiny_llama)))
    src.add(lora_b, entry("modpo-balanced", base_model=str(tiny_llama)))
    assert adapters_extrapolate(out=str(tmp_path / "x"), lam=0.5, store=str(src.root)) == 0
    out = AdapterStore(tmp_path / "x")
    assert out.ids() == ["modpo-empathy"], "only the adapters that emphasise an objective, never the anchor"
    e = out.entry("modpo-empathy")
    assert e.recipe == "merge" and e.recipe in TUNED_RECIPES and e.primary_objective == "empathy"
    assert e.weights == src.entry("modpo-empathy").weights and e.lora.r == 4 + 8
    assert [(p.id, p.weight) for p in e.parents] == [("modpo-empathy", 1.5), ("modpo-balanced", -0.5)]
    _, ref = peft_deltas(tiny_llama, {"a": lora_a, "b": lora_b, "x": out.get("modpo-empathy")})
    assert_close_all(ref["x"], {m: 1.5 * ref["a"].get(m, 0) - 0.5 * ref["b"].get(m, 0)
                                for m in ref["a"].keys() | ref["b"].keys()})
    assert "compare them with `attune eval tune" in capsys.readouterr().out
    assert adapters_extrapolate(out=str(tmp_path / "x"), store=str(src.root)) == 2
    assert adapters_extrapolate(out=str(tmp_path / "y"), lam=-1, store=str(src.root)) == 2
    assert "positive" in capsys.readouterr().err
