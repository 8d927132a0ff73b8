"""Every shipped recipe loads against the code that consumes it; bad recipes fail clearly."""
import json

import pytest
import yaml

from alignment.recipe import Recipe, load_recipe
from attune.paths import RECIPES_DIR

SHIPPED = sorted(RECIPES_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_loads(path):
    r = load_recipe(str(path))
    args = r.train_args()
    assert args.lora_r <= 16
    for a in r.adapters:
        a.preference()
        if a.init_from is not None:  # a committed adapter of the recipe's LoRA shape, on any clone
            from alignment.pipeline import init_folder

            config = json.loads((init_folder(a) / "adapter_config.json").read_text())
            assert (config["r"], config["layers_to_transform"]) == (args.lora_r, args.layers_to_transform), a.id
            assert (init_folder(a) / "adapter_model.safetensors").is_file()


def test_shipped_grid_meets_the_issue():
    r = load_recipe("shipped")
    modpo = [a for a in r.adapters if a.recipe == "modpo"]
    assert len(modpo) >= 7
    assert {a.primary for a in modpo} >= {"empathy", "safety", "active_listening", "self_motivated_change",
                                          "trust_rapport", "patient_autonomy"}
    assert all(a.weights["safety"] >= r.safety_floor for a in modpo)
    paper = next(a for a in modpo if a.id == "modpo-empathy-safety")
    assert paper.weights == {"empathy": 0.5, "safety": 0.5}
    assert {a.recipe for a in r.adapters} >= {"sft", "dpo", "joint_dpo", "soup"}


def _recipe(**adapter):
    return {"name": "t", "adapters": [adapter]}


@pytest.mark.parametrize("adapter,needle", [
    ({"id": "mo", "recipe": "modpo", "primary": "empathy", "weights": {"empathy": 1.0}}, "safety_floor"),
    ({"id": "mo", "recipe": "modpo", "primary": "empathy"}, "needs `weights`"),
    ({"id": "mo", "recipe": "dpo", "primary": "kindness"}, "unknown objective"),
    ({"id": "mo", "recipe": "modpo", "primary": "empathy", "weights": {"empathy": 0.5, "safety": 0.6}}, "sum"),
    ({"id": "so", "recipe": "soup", "parents": [{"id": "missing", "weight": 1}]}, "before it"),
    ({"id": "sf", "recipe": "sft", "pair_selection": "contrastive"}, "dpo and modpo adapters only"),
    ({"id": "mo", "recipe": "dpo", "primary": "empathy", "pair_selection": "best_of_all"}, "pair_selection"),
    ({"id": "sf", "recipe": "sft", "corpus_rounds": [1, 2]}, "corpus_rounds applies to dpo and modpo"),
    ({"id": "su", "recipe": "sft", "init_from": "adapters/store/sft"}, "init_from applies to dpo and modpo"),
    ({"id": "jo", "recipe": "joint_dpo", "weights": {"empathy": 1.0}, "max_pairs": 10}, "max_pairs applies to"),
    ({"id": "mo", "recipe": "dpo", "primary": "empathy", "corpus_rounds": []}, "corpus_rounds"),
])
def test_bad_recipe_says_what_to_fix(adapter, needle):
    with pytest.raises(ValueError, match=needle):
        Recipe.model_validate(_recipe(**adapter))


def test_unknown_train_field_is_rejected():
    with pytest.raises(ValueError, match="unknown train field"):
        Recipe.model_validate({"name": "t", "train": {"lr": 1}, "adapters": []})


def test_a_default_pair_selection_leaves_the_adapter_hash_as_it_was():
    """Adapters trained before `pair_selection`, `corpus_rounds` or `max_pairs` existed keep their recipe hash, so
    `attune train` still reuses them."""
    from alignment.pipeline import recipe_hash, spec_for_hash
    from alignment.recipe import AdapterSpec

    spec = {"id": "dpo-empathy", "recipe": "dpo", "primary": "empathy"}
    before = {**spec, "weights": None, "parents": None}  # the dump of the spec before the field existed
    assert recipe_hash(spec_for_hash(AdapterSpec(**spec))) == recipe_hash(before)
    assert recipe_hash(spec_for_hash(AdapterSpec(**spec, pair_selection="contrastive"))) != recipe_hash(before)
    for added in ({"corpus_rounds": [1, 2]}, {"max_pairs": 100}, {"init_from": "adapters/store/dpo-empathy"}):
        assert recipe_hash(spec_for_hash(AdapterSpec(**spec, **added))) != recipe_hash(before)


def test_a_default_rpo_alpha_leaves_the_train_args_hash_as_it_was():
    """rpo_alpha at 0 hashes as TrainArgs did before the field existed; any other value is a new adapter."""
    from dataclasses import asdict

    from alignment.pipeline import recipe_hash, train_args_for_hash
    from alignment.trainers import TrainArgs

    before = {k: v for k, v in asdict(TrainArgs()).items() if k != "rpo_alpha"}
    assert recipe_hash(train_args_for_hash(TrainArgs())) == recipe_hash(before)
    assert recipe_hash(train_args_for_hash(TrainArgs(rpo_alpha=0.5))) != recipe_hash(before)


def test_init_from_puts_the_starting_weights_into_the_hash(tmp_path):
    """An adapter that starts from another is a new adapter whenever the weights it starts from change."""
    from alignment.pipeline import init_folder, init_weights_hash
    from alignment.recipe import AdapterSpec

    folder = tmp_path / "start"
    folder.mkdir()
    spec = AdapterSpec(id="dpo-empathy", recipe="dpo", primary="empathy", init_from=str(folder))
    assert init_folder(spec) == folder and init_weights_hash(AdapterSpec(id="x1", recipe="sft")) == []
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        init_weights_hash(spec)
    (folder / "adapter_model.safetensors").write_bytes(b"one")
    first = init_weights_hash(spec)
    (folder / "adapter_model.safetensors").write_bytes(b"two")
    assert len(first) == 1 and init_weights_hash(spec) != first
    rel = AdapterSpec(id="dpo-empathy", recipe="dpo", primary="empathy", init_from="adapters/store/dpo-empathy")
    assert init_weights_hash(rel)  # relative to the repository root: the shipped adapter is there
