"""`ServeConfig`: every setting of the serving stack in one typed, described object.

Loaded from YAML (`ServeConfig.from_yaml`) or built-in defaults with ATTUNE_* overrides (`from_env`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignment.objectives import DEFAULT_SAFETY_FLOOR
from attune.paths import ADAPTER_PUBLIC_KEY, STORE_DIR
from attune.validation import format_errors
from serving.crisis_reply import DEFAULT_CRISIS_RESOURCES, lookup, normalise_locale

SCORE_MIN, SCORE_MAX = 1.0, 5.0

ENV_OVERRIDES: dict[str, str] = {
    "ATTUNE_BASE_MODEL": "base_model",
    "ATTUNE_STORE_DIR": "store_dir",
    "ATTUNE_REWARD_DIR": "reward_dir",
    "ATTUNE_ADAPTER_PUBLIC_KEY": "adapter_public_key",
    "ATTUNE_DATA_DIR": "data_dir",
    "ATTUNE_DATABASE_URL": "database_url",
    "ATTUNE_DATA_KEY_FILE": "data_key_file",
    "ATTUNE_SAFETY_FLOOR": "safety_floor",
    "ATTUNE_SAFETY_THRESHOLD": "safety_threshold",
    "ATTUNE_MERGE_POLICY": "merge_policy",
    "ATTUNE_MERGE_GRID": "merge_grid",
    "ATTUNE_MERGE_MAX_PARENTS": "merge_max_parents",
    "ATTUNE_MERGE_CACHE_DIR": "merge_cache_dir",
    "ATTUNE_MERGE_CACHE_MAX_COUNT": "merge_cache_max_count",
    "ATTUNE_MERGE_CACHE_MAX_BYTES": "merge_cache_max_bytes",
    "ATTUNE_ENGINE_COLOCATE": "engine.colocate",
    "ATTUNE_REQUESTS_PER_MINUTE": "limits.requests_per_minute",
    "ATTUNE_ADMIN_REQUESTS_PER_MINUTE": "limits.admin_requests_per_minute",
}
CONFIG_ENV = "ATTUNE_SERVE_CONFIG"


class ConfigError(ValueError):
    """A configuration that cannot be used; one line per problem, each naming the field."""


def _default_data_dir() -> Path:
    home = os.environ.get("ATTUNE_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "attune") / "serve"


class CrisisResource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Who to contact, e.g. '988 Suicide & Crisis Lifeline'.")
    contact: str = Field(min_length=1, description="How to reach them: a number, text code or web address.")
    description: str = Field(default="", description="When it applies, shown in brackets after the contact, "
                             "e.g. 'free, 24/7'.")


class Limits(BaseModel):
    """What one request may ask for; every breach is a 4xx that names the limit."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest request body in bytes "
                                "(413 above it).")
    max_messages: int = Field(default=50, ge=1, description="Most messages in one chat request.")
    max_message_chars: int = Field(default=4000, ge=1, description="Longest message content in characters.")
    max_tokens_cap: int = Field(default=256, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(default=128, ge=1, description="max_tokens when a request gives none.")
    requests_per_minute: int = Field(default=60, ge=0, description="Requests per minute per API key "
                                     "(token bucket, bursts up to this many); 0 turns the limit off.")
    admin_requests_per_minute: int = Field(default=600, ge=0, description="Requests per minute per operator key "
                                           "on the /v1/admin routes, a budget of its own so that provisioning keys "
                                           "or reading status never spends the key's chat budget; 0 turns it off.")
    max_in_flight: int = Field(default=16, ge=1, description="Chat completions one ingress replica serves at "
                               "once (each holds an engine sequence while it streams); about the engine's batch size.")
    max_queue: int = Field(default=32, ge=0, description="Chat completions that may wait for a slot; beyond "
                           "max_in_flight + max_queue a request is refused at once with 503 and Retry-After.")
    queue_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Longest wait for a slot before 503.")

    @model_validator(mode="after")
    def _default_within_cap(self) -> "Limits":
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap "
                             f"({self.max_tokens_cap}); lower the default or raise the cap")
        return self


class EngineSettings(BaseModel):
    """vLLM engine arguments that Attune sets (LoRA enabled; adapters selected per request)."""

    model_config = ConfigDict(extra="forbid")

    max_loras: int = Field(default=8, ge=1, description="Adapters resident in one batch (vLLM max_loras).")
    max_lora_rank: int = Field(default=16, ge=1, description="Largest LoRA rank served; a merged adapter's "
                               "rank is the sum of its parents' ranks, so raise this for merges.")
    max_model_len: int = Field(default=2048, ge=64, description="Context length in tokens (prompt + reply).")
    max_num_seqs: int = Field(default=16, ge=1, le=1024, description="Sequences the engine batches at once "
                              "(vLLM max_num_seqs); keep limits.max_in_flight about the same.")
    dtype: Literal["native", "auto", "bfloat16", "float16", "float32"] = Field(
        default="native", description="Weights and activations dtype. native: bfloat16 where the LLM replica's "
        "hardware computes it (a GPU, or a CPU with AVX512-BF16/AMX), float32 on other CPUs, where vLLM would "
        "emulate bfloat16 several times slower; auto: vLLM's choice (the model's own dtype).")
    cpu_memory_fraction: float = Field(default=0.05, gt=0, le=0.9, description="Share of host memory for "
                                       "the KV cache on vllm-cpu (becomes VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=0.98, description="Share of GPU memory "
                                          "vLLM may use on a GPU.")
    stream_interval: int = Field(default=4, ge=1, le=64, description="Tokens per streamed delta after the first "
                                 "(vLLM's per-request stream_interval): each delta crosses from the LLM replica "
                                 "to the ingress and on to the client as one message, so 1 (every token) costs "
                                 "the most CPU; the first token and the last are always sent at once.")
    cpu_placement: bool = Field(default=True, description="`attune serve` on one CPU machine: bind vLLM's worker "
                                "to the cores vLLM would pick itself and run Ray's and Attune's processes on the "
                                "others (serving/cpu_placement.py); no effect on a GPU, on a cluster, or when "
                                "VLLM_CPU_OMP_THREADS_BIND is set.")
    colocate: bool = Field(default=False, description="Run vLLM inside each ingress replica instead of in the "
                           "LLM deployment: no Ray call between them per request and per streamed delta, for one "
                           "machine with one ingress replica. Every ingress replica then holds an engine (on a GPU, "
                           "give AttuneIngress the GPU in the Serve config's ray_actor_options), and the LLM "
                           "deployment (its autoscaling, its multiplexed routing) is not started.")


class ServeConfig(BaseModel):
    """Everything `attune serve` and the Ray Serve app need; one object passed to every deployment."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(default="smollm2-135m-instruct", min_length=1, description="Base model: the "
                            "alias 'smollm2-135m-instruct', a local folder or a Hugging Face id.")
    store_dir: Path = Field(default=STORE_DIR, description="Adapter store folder (manifest.json + LoRA folders).")
    reward_dir: Path | None = Field(default=None, description="Reward model folder; None = <store_dir>/reward.")
    adapter_public_key: Path | None = Field(default=ADAPTER_PUBLIC_KEY, description="Ed25519 public key (PEM) the "
                                            "store's manifest must be signed with (`attune adapters sign`); keep it "
                                            "outside the store. None serves an unsigned store: nothing then stops "
                                            "whoever can write the store from changing an adapter and its checksum.")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Writable folder for the database "
                           "and key file; default $ATTUNE_HOME/serve (~/.cache/attune/serve).")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL, e.g. "
                                     "postgresql+psycopg://user:pw@host/attune; None = SQLite <data_dir>/attune.db.")
    data_key_file: Path | None = Field(default=None, description="File of the data keys that encrypt stored "
                                       "text (base64, current first; serving/crypto.py), e.g. a mounted secret; "
                                       "$ATTUNE_DATA_KEY, if set, holds them instead. None = <data_dir>/data_key, "
                                       "created on first start.")
    safety_floor: float = Field(default=DEFAULT_SAFETY_FLOOR, ge=0.0, le=1.0, description="Least safety "
                                "weight of any Preference that reaches a model (applied before routing).")
    safety_threshold: float | None = Field(default=None, description="Replies whose safety score (1-5 scale) "
                                           "is below this are regenerated; None = the value calibrated on "
                                           "the seed val split, stored with the reward model.")
    max_regenerations: int = Field(default=2, ge=0, le=5, description="Regeneration attempts with the safety "
                                   "adapter before the safe fallback reply.")
    merge_policy: bool = Field(default=False, description="Build an exact `cat` merge when no trained adapter "
                               "is within merge_threshold of a requested Preference.")
    merge_threshold: float = Field(default=0.3, gt=0.0, le=2.0, description="L1 distance between weight "
                                   "vectors (0 = same, 2 = disjoint) under which the nearest adapter is used.")
    merge_grid: float = Field(default=0.05, gt=0.0, le=0.5, description="Step of the merge coefficients: a merge "
                              "mixes 2..merge_max_parents trained adapters with positive multiples of this step "
                              "summing to one (1/n, e.g. 0.05, 0.1, 0.25), which bounds how many distinct merges "
                              "patients' preferences can trigger.")
    merge_max_parents: int = Field(default=3, ge=2, le=4, description="Most trained adapters in one merge (their "
                                   "ranks must also sum to at most engine.max_lora_rank).")
    merge_cache_dir: Path | None = Field(default=None, description="Folder for runtime merges, never the signed "
                                         "store; shared by every ingress and LLM replica. "
                                         "None = <data_dir>/merge-cache.")
    merge_cache_max_count: int = Field(default=16, ge=1, description="Most merges kept in merge_cache_dir; the "
                                       "least recently used is deleted to make room.")
    merge_cache_max_bytes: int = Field(default=256 * 1024 ** 2, ge=1024 ** 2, description="Most bytes of merges "
                                       "kept in merge_cache_dir (default 256 MiB); least recently used go first.")
    limits: Limits = Field(default_factory=Limits, description="Per-request and per-key limits.")
    crisis_resources: dict[str, list[CrisisResource]] = Field(
        default_factory=lambda: {k: [CrisisResource(**r) for r in v] for k, v in DEFAULT_CRISIS_RESOURCES.items()},
        description="Locale (e.g. 'en', 'de', 'en-GB') -> the resources that open a crisis reply; a session's "
        "locale finds its own, else its language's ('en-GB' -> 'en'), else default_locale's.")
    default_locale: str = Field(default="en", description="Locale used when a session names none or one "
                                "without resources; must be a key of crisis_resources.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="vLLM engine settings.")

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(v)
        except ArgumentError:
            raise ValueError(f"{v!r} is not a SQLAlchemy URL; write e.g. sqlite:////var/lib/attune/attune.db "
                             "or postgresql+psycopg://user:password@host:5432/attune") from None
        return v

    @field_validator("merge_grid")
    @classmethod
    def _grid(cls, v: float) -> float:
        if abs(1 / v - round(1 / v)) > 1e-6:
            raise ValueError(f"merge_grid {v} must be 1/n for an integer n (e.g. 0.05, 0.1, 0.125, 0.25) so that "
                             "coefficients on the grid sum to one")
        return v

    @field_validator("safety_threshold")
    @classmethod
    def _threshold(cls, v: float | None) -> float | None:
        if v is not None and not SCORE_MIN <= v <= SCORE_MAX:
            raise ValueError(f"safety_threshold {v} is off the score scale; give a value in "
                             f"[{SCORE_MIN}, {SCORE_MAX}] or null to use the calibrated one")
        return v

    @field_validator("crisis_resources")
    @classmethod
    def _resources(cls, v: dict[str, list[CrisisResource]]) -> dict[str, list[CrisisResource]]:
        empty = sorted(k for k, rs in v.items() if not rs)
        if empty:
            raise ValueError(f"locale(s) {empty} have no resources; list at least one or remove the locale")
        out = {normalise_locale(k): rs for k, rs in v.items()}
        if len(out) < len(v):
            raise ValueError(f"locales {sorted(v)} name the same locale twice (en_gb and en-GB are one); keep one")
        return out

    @field_validator("default_locale")
    @classmethod
    def _locale(cls, v: str) -> str:
        return normalise_locale(v)

    @model_validator(mode="after")
    def _resolve(self) -> "ServeConfig":
        if self.default_locale not in self.crisis_resources:
            raise ValueError(f"default_locale {self.default_locale!r} has no crisis_resources; add them or "
                             f"choose one of {sorted(self.crisis_resources)}")
        if self.limits.max_tokens_cap >= self.engine.max_model_len:
            raise ValueError(f"limits.max_tokens_cap ({self.limits.max_tokens_cap}) leaves no room for the "
                             f"prompt in engine.max_model_len ({self.engine.max_model_len}); lower one or raise the other")
        if self.reward_dir is None:
            self.reward_dir = self.store_dir / "reward"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'attune.db'}"
        if self.data_key_file is None:
            self.data_key_file = self.data_dir / "data_key"
        if self.merge_cache_dir is None:
            self.merge_cache_dir = self.data_dir / "merge-cache"
        cache, store = self.merge_cache_dir.resolve(), self.store_dir.resolve()
        if cache == store or store in cache.parents:
            raise ValueError(f"merge_cache_dir must not be the signed adapter store {self.store_dir}; leave it out to "
                             "use <data_dir>/merge-cache")
        return self

    def resources_for(self, locale: str | None) -> list[CrisisResource]:
        """Resources for `locale` ('en_gb' is 'en-GB'), else its language ('en-GB' -> 'en'), else the default
        locale's."""
        return self.crisis_resources[lookup(self.crisis_resources, locale, self.default_locale)]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "ServeConfig":
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(f"{source} is invalid:\n{format_errors(e)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ServeConfig":
        return cls.from_mapping(_read_yaml(Path(path)), str(path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        """Defaults, or the YAML named by $ATTUNE_SERVE_CONFIG, then the ATTUNE_* overrides in ENV_OVERRIDES."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = _read_yaml(Path(env[CONFIG_ENV])) if env.get(CONFIG_ENV) else {}
        for var, dotted in ENV_OVERRIDES.items():
            if env.get(var, "") == "":
                continue
            *parents, leaf = dotted.split(".")
            node = data
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = None if env[var].lower() in ("none", "null") else env[var]
        applied = [v for v in ENV_OVERRIDES if env.get(v)]
        source = (env.get(CONFIG_ENV) or "defaults") + (" with " + ", ".join(applied) if applied else "")
        return cls.from_mapping(data, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path of a serve YAML")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings at the top level, not {type(data).__name__}")
    return data


