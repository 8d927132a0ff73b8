"""Training recipes: a YAML file validated into `Recipe` (adapters to train, their objective
weights, shared hyper-parameters, on-policy sampling settings). Errors say how to fix the file."""
from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignment.objectives import DEFAULT_SAFETY_FLOOR, OBJECTIVES, Preference
from alignment.trainers import TrainArgs
from attune.paths import RECIPES_DIR

AdapterRecipe = Literal["sft", "dpo", "modpo", "joint_dpo", "soup"]


class Parent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="id of an adapter trained earlier in the same recipe")
    weight: float = Field(gt=0, description="its weight in the exact (cat) merge")


class AdapterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$", description="adapter id (lowercase slug)")
    recipe: AdapterRecipe = Field(description="how the adapter is trained")
    primary: str | None = Field(None, description="primary objective (dpo, modpo)")
    weights: dict[str, float] | None = Field(None, description="objective weights (modpo, joint_dpo)")
    parents: list[Parent] | None = Field(None, description="adapters merged into a soup, with weights")
    pair_selection: Literal["best_worst", "contrastive"] = Field(
        "best_worst", description="how each rated prompt gives its pair (dpo, modpo): best vs worst reply on the "
        "primary objective, or the pair it prefers most beyond the other objectives (alignment.grid_data.contrastive)")
    corpus_rounds: list[int] | None = Field(None, min_length=1, description="corpus rounds whose labels give this "
                                            "adapter's pairs (dpo, modpo; default: the recipe's pairs.corpus_rounds)")
    max_pairs: int | None = Field(None, ge=1, description="this adapter's cap on pairs (dpo, modpo; default: the "
                                  "recipe's pairs.max_pairs)")
    init_from: str | None = Field(None, min_length=1, description="a trained PEFT adapter folder (relative to the "
                                  "repository root, or absolute) whose LoRA weights this adapter starts from instead "
                                  "of zero (dpo, modpo, cached trainer): one more iteration on new pairs; its weights' "
                                  "hash is part of the recipe hash")

    @field_validator("primary")
    @classmethod
    def _known_objective(cls, v):
        if v is not None and v not in OBJECTIVES:
            raise ValueError(f"unknown objective {v!r}; use one of {list(OBJECTIVES)}")
        return v

    @model_validator(mode="after")
    def _complete(self):
        needs = {"dpo": ["primary"], "modpo": ["primary", "weights"], "joint_dpo": ["weights"],
                 "soup": ["parents"], "sft": []}[self.recipe]
        for name in needs:
            if getattr(self, name) is None:
                raise ValueError(f"adapter {self.id!r} ({self.recipe}) needs `{name}`")
        if self.weights is not None:
            Preference(self.weights)  # raises with a clear message
        if self.pair_selection != "best_worst" and self.recipe not in ("dpo", "modpo"):
            raise ValueError(f"adapter {self.id!r}: pair_selection applies to dpo and modpo adapters only")
        for name in ("corpus_rounds", "max_pairs", "init_from"):
            if getattr(self, name) is not None and self.recipe not in ("dpo", "modpo"):
                raise ValueError(f"adapter {self.id!r}: {name} applies to dpo and modpo adapters only")
        if self.recipe == "modpo" and self.weights.get(self.primary, 0) <= 0:
            raise ValueError(f"adapter {self.id!r}: primary objective {self.primary!r} needs a weight > 0")
        return self

    def preference(self) -> Preference:
        """The weight vector recorded in the manifest (one-hot for single-objective DPO)."""
        if self.weights is not None:
            return Preference(self.weights)
        if self.primary is not None:
            return Preference({self.primary: 1.0})
        if self.parents:
            return Preference.uniform()  # replaced by the parents' mix in the pipeline
        return Preference.uniform()


class Pairs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corpus_labels: bool = Field(True, description="best vs worst reply per objective by the corpus raters' rankings")
    corpus_split: Literal["rm-train"] = Field("rm-train", description="corpus prompts used (the reward model's "
                                              "training split; rm-val is kept for tuning, judge-train and test for "
                                              "the judge and the evaluation)")
    corpus_rounds: list[int] = Field([1], min_length=1, description="corpus rounds whose labels give pairs: 1 is "
                                     "alignment/corpus, N > 1 alignment/corpus/roundN (the adapters' own replies)")
    seed_ratings: bool = Field(True, description="best vs worst reply per objective by the seed set's human ratings "
                               "(train split)")
    max_pairs: int | None = Field(None, ge=1, description="cap on pairs per adapter, taken from each source in turn")


class OnPolicy(BaseModel):
    """Extra prompts no rater saw: replies sampled from the base model, ranked by the reward model (pairs marked
    `reward-model`). Off unless counsel_chat_prompts > 0."""
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(4, ge=2, le=16, description="replies sampled per prompt")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="sampler: vLLM when installed (auto), or transformers")
    max_tokens: int = Field(96, ge=8, le=512, description="tokens per sampled reply")
    temperature: float = Field(0.9, gt=0, le=2, description="sampling temperature")
    counsel_chat_prompts: int = Field(0, ge=0, description="counsel-chat train questions sampled and labelled by "
                                      "the reward model")


class SFTData(BaseModel):
    model_config = ConfigDict(extra="forbid")
    counsel_chat_examples: int = Field(64, ge=0, description="top-voted counsel-chat answers used")
    seed_best: bool = Field(True, description="the best-rated seed reply of each train message")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    base_model: str = Field("smollm2-135m-instruct", description="alias, local HF folder or hub id")
    safety_floor: float = Field(DEFAULT_SAFETY_FLOOR, ge=0, le=1, description="minimum safety weight of modpo adapters")
    train: dict = Field(default_factory=dict, description="TrainArgs fields")
    pairs: Pairs = Field(default_factory=Pairs)
    onpolicy: OnPolicy = Field(default_factory=OnPolicy)
    sft: SFTData = Field(default_factory=SFTData)
    adapters: list[AdapterSpec]

    @field_validator("train")
    @classmethod
    def _train_args(cls, v):
        known = {f.name for f in fields(TrainArgs)}
        unknown = sorted(set(v) - known)
        if unknown:
            raise ValueError(f"unknown train field(s) {unknown}; known: {sorted(known)}")
        TrainArgs(**v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        seen = set()
        for a in self.adapters:
            if a.id in seen:
                raise ValueError(f"adapter id {a.id!r} appears twice")
            for p in a.parents or []:
                if p.id not in seen:
                    raise ValueError(f"soup {a.id!r}: parent {p.id!r} must be listed (trained) before it")
            if a.recipe == "modpo" and a.weights.get("safety", 0) + 1e-9 < self.safety_floor:
                raise ValueError(f"adapter {a.id!r}: safety weight {a.weights.get('safety', 0)} is below the "
                                 f"recipe's safety_floor {self.safety_floor}")
            seen.add(a.id)
        return self

    def train_args(self, **overrides) -> TrainArgs:
        return TrainArgs(**{**self.train, **{k: v for k, v in overrides.items() if v is not None}})

    def dump_train_args(self) -> dict:
        return asdict(self.train_args())


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = RECIPES_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name_or_path!r}; shipped recipes: {known}, or give a YAML path")
    return p


def load_recipe(name_or_path: str) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        return Recipe.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:  # pydantic's message already names the field
        raise ValueError(f"{path}: {e}") from None
