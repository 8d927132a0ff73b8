"""The adapter store's `manifest.json`: one `AdapterManifest` per LoRA folder plus named preference profiles.

Saved with sorted keys, indent 2 and adapters ordered by id, so a change shows as a small diff.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from alignment.objectives import OBJECTIVES, Preference, PreferenceError
from attune.validation import format_errors  # noqa: F401 (re-exported for adapters.registry)

MANIFEST_FILE = "manifest.json"
RECIPES = ("sft", "dpo", "modpo", "joint_dpo", "soup", "merge")
Recipe = Literal["sft", "dpo", "modpo", "joint_dpo", "soup", "merge"]
SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

DEFAULT_PROFILES: dict[str, dict[str, float]] = {
    "balanced": {o: 1 / 6 for o in OBJECTIVES},
    "warm": {"empathy": 0.35, "safety": 0.2, "active_listening": 0.15,
             "self_motivated_change": 0.05, "trust_rapport": 0.2, "patient_autonomy": 0.05},
    "change": {"empathy": 0.1, "safety": 0.2, "active_listening": 0.1,
               "self_motivated_change": 0.4, "trust_rapport": 0.05, "patient_autonomy": 0.15},
    "autonomy": {"empathy": 0.1, "safety": 0.2, "active_listening": 0.1,
                 "self_motivated_change": 0.1, "trust_rapport": 0.1, "patient_autonomy": 0.4},
}


class ManifestError(ValueError):
    """A manifest that cannot be loaded or saved; the message names the field and the fix."""


def _preference_dict(value: Mapping[str, float], *, require_all: bool) -> dict[str, float]:
    """Validate as a Preference but keep the numbers as written, so load -> save is byte-stable."""
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping objective -> weight over {list(OBJECTIVES)}")
    missing = [o for o in OBJECTIVES if o not in value]
    if require_all and missing:
        raise ValueError(f"missing objective(s) {missing}; give all six {list(OBJECTIVES)} (0 is allowed)")
    try:
        Preference(value)
    except PreferenceError as e:
        raise ValueError(str(e)) from None
    return {o: float(value.get(o, 0.0)) for o in OBJECTIVES}


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(gt=0, description="LoRA rank (for a `cat` merge: the sum of the parents' ranks).")
    alpha: float = Field(gt=0, description="lora_alpha; PEFT scales the update by alpha / r.")
    target_modules: list[str] = Field(
        min_length=1, description="Module names the adapter wraps, e.g. ['q_proj', 'v_proj'].")


class ParentRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Id of a parent adapter in the same store.")
    weight: float | None = Field(
        default=None, description="Its weight in the merge (delta W = sum weight_i * delta W_i).")


class AdapterManifest(BaseModel):
    """One LoRA folder `<store>/<id>/` and what it was trained or merged for."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Slug naming the adapter and its folder: lowercase letters, digits, "
                                "'-' and '_', 1-64 characters, starting and ending alphanumeric.")
    recipe: Recipe = Field(description=f"How it was made, one of {list(RECIPES)}.")
    weights: dict[str, float] = Field(description="The Preference it serves: all six objectives, "
                                                  "non-negative, summing to 1 (±1e-3).")
    primary_objective: str | None = Field(
        default=None, description="For MODPO: the objective optimised directly; the others are margins.")
    base_model: str = Field(min_length=1, description="Base model alias, folder or hub id it applies to.")
    data_hash: str = Field(description="Hash of the training data (empty for merges of stored adapters).")
    lora: LoraSpec = Field(description="LoRA shape: {r, alpha, target_modules}.")
    files: dict[str, str] = Field(default_factory=dict, description="Every file of the folder: "
                                  "relative POSIX path -> sha256 hex digest (see adapters.integrity).")
    eval: dict[str, Any] = Field(default_factory=dict, description="Free-form evaluation scores.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         description="ISO 8601 creation time, e.g. 2025-01-31T12:00:00+00:00.")
    parents: list[ParentRef] = Field(default_factory=list, validate_default=True, description="Adapters it was merged from, "
                                     "as [{id, weight}] (a bare id string is accepted).")

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not SLUG.match(v):
            raise ValueError(f"{v!r} is not a slug: use lowercase letters, digits, '-' and '_' "
                             "(1-64 characters, starting and ending with a letter or digit)")
        return v

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> dict[str, float]:
        return _preference_dict(v, require_all=True)

    @field_validator("primary_objective")
    @classmethod
    def _primary(cls, v: str | None) -> str | None:
        if v is not None and v not in OBJECTIVES:
            raise ValueError(f"unknown objective {v!r}; use one of {list(OBJECTIVES)} or leave it out")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for rel, digest in v.items():
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or "\\" in rel or not rel:
                raise ValueError(f"file path {rel!r} must be relative to the adapter folder, without '..'")
            if not SHA256_HEX.match(digest):
                raise ValueError(f"digest for {rel!r} must be 64 lowercase hex characters (sha256)")
        return dict(sorted(v.items()))

    @field_validator("created")
    @classmethod
    def _iso(cls, v: str) -> str:
        try:
            datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an ISO 8601 time; write e.g. 2025-01-31T12:00:00+00:00") from None
        return v

    @field_validator("parents", mode="before")
    @classmethod
    def _parent_ids(cls, v: Any) -> Any:
        return [{"id": p} if isinstance(p, str) else p for p in v] if isinstance(v, list) else v

    @field_validator("parents")
    @classmethod
    def _merge_has_parents(cls, v: list[ParentRef], info: ValidationInfo) -> list[ParentRef]:
        if info.data.get("recipe") == "merge" and (not v or any(p.weight is None for p in v)):
            raise ValueError("recipe 'merge' needs parents=[{id, weight}, ...] with a weight for each parent")
        return v

    @property
    def preference(self) -> Preference:
        return Preference(self.weights)


class ManifestSignature(BaseModel):
    """The operator's Ed25519 signature over the rest of the manifest (see adapters.signing)."""

    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["ed25519"] = Field(default="ed25519", description="Signature scheme; only ed25519 exists.")
    key_id: str = Field(description="First 16 hex digits of the sha256 of the signing key's raw public key.")
    manifest_sha256: str = Field(description="sha256 of the manifest without `signature`, as canonical JSON.")
    signed_at: str = Field(description="ISO 8601 time of signing (covered by the signature).")
    value: str = Field(description="The signature, base64, over adapters.signing.signed_message().")


class StoreManifest(BaseModel):
    """The whole `manifest.json`."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(default=1, description="Schema version; only 1 exists.")
    adapters: list[AdapterManifest] = Field(default_factory=list, description="Registered adapters.")
    scorers: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="sha256 allowlists of the store's reward model and judge folders: "
        "name ('reward' or 'judge') -> {relative path: sha256}. The scorer refuses a folder that does not match.")
    profiles: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PROFILES.items()},
        description="Named preference profiles (e.g. warm, change, autonomy, balanced): name -> weights "
                    "summing to 1; objectives left out weigh 0. Defaults to DEFAULT_PROFILES.")
    signature: ManifestSignature | None = Field(
        default=None, description="Ed25519 signature over everything else in the file (`attune adapters sign`); "
        "writers keep it as it was, so any change leaves it stale until the operator signs again.")

    @field_validator("adapters")
    @classmethod
    def _unique(cls, v: list[AdapterManifest]) -> list[AdapterManifest]:
        dupes = sorted(i for i, n in Counter(a.id for a in v).items() if n > 1)
        if dupes:
            raise ValueError(f"duplicate adapter id(s) {dupes}; every id must appear once (rename or remove one)")
        return v

    @field_validator("profiles", mode="before")
    @classmethod
    def _profiles(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        out = {}
        for name, w in v.items():
            try:
                out[name] = _preference_dict(w, require_all=False)
            except ValueError as e:
                raise ValueError(f"profile {name!r}: {e}") from None
        return out

    def find(self, adapter_id: str) -> AdapterManifest | None:
        return next((a for a in self.adapters if a.id == adapter_id), None)

    def profile(self, name: str) -> Preference:
        if name not in self.profiles:
            raise KeyError(f"unknown profile {name!r}; known profiles: {sorted(self.profiles)}")
        return Preference(self.profiles[name])


def parse_manifest(data: Mapping[str, Any], source: str = "manifest") -> StoreManifest:
    try:
        return StoreManifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(f"{source} is invalid:\n{format_errors(e)}") from None


def read_manifest_data(path: Path) -> dict[str, Any] | None:
    """The parsed JSON of `path`, unvalidated; None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object (version, adapters, scorers, profiles)")
    return data


def load_manifest(path: Path) -> StoreManifest:
    """Read and validate `path`; a missing file is an empty store (with the default profiles)."""
    data = read_manifest_data(path)
    return StoreManifest() if data is None else parse_manifest(data, str(path))


def dumps(manifest: StoreManifest) -> str:
    data = manifest.model_dump(mode="json")
    data["adapters"] = sorted(data["adapters"], key=lambda a: a["id"])
    if data["signature"] is None:
        del data["signature"]
    return json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def save_manifest(manifest: StoreManifest, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, fsynced, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(manifest)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
