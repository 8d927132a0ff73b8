"""`AdapterStore`: PEFT LoRA folders `<root>/<id>/` listed in `<root>/manifest.json`, checked by sha256.

`get` verifies a folder against its allowlist before handing out its path; with a public key, the manifest's
Ed25519 signature is checked on every read (adapters.signing). Writers hold an
exclusive lock (a file in the temp dir, keyed by the root) and replace manifest.json atomically.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from adapters.integrity import IntegrityError, hash_folder, verify
from adapters.manifest import (MANIFEST_FILE, AdapterManifest, ManifestError, ManifestSignature, StoreManifest, dumps,
                               format_errors, load_manifest, parse_manifest, read_manifest_data, save_manifest)
from adapters.signing import load_public_key, sign_data, verify_data
from alignment.objectives import Preference
from attune.locks import file_lock


log = logging.getLogger("attune.adapters")
_WARNED: set[Path] = set()
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
RESERVED_IDS = ("reward", "judge", "crisis")
"""Folders of the store that hold the reward model, the judge and the crisis detector: never registered or removed as adapters."""


class UnknownAdapter(KeyError):
    """An adapter id that is not in the store; `known` lists the ids that are."""

    def __init__(self, adapter_id: str, known: list[str]):
        self.adapter_id, self.known = adapter_id, known
        super().__init__(adapter_id)

    def __str__(self) -> str:
        return f"unknown adapter {self.adapter_id!r}; the store has {self.known or 'no adapters'}"


def read_lora_config(folder: Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA folder; ValueError saying what is missing otherwise."""
    folder = Path(folder)
    missing = [f for f in PEFT_FILES if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a PEFT LoRA folder: missing {missing} "
                         "(save it with PeftModel.save_pretrained, safe_serialization=True)")
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder}/adapter_config.json is not valid JSON: {e.msg}") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{folder}/adapter_config.json has peft_type={cfg.get('peft_type')!r}; only LORA is stored")
    return cfg


def carried_entry(folder: Path) -> AdapterManifest | None:
    """The entry another store keeps for `folder`, i.e. `folder.name` in `folder/../manifest.json` (a folder
    copied out of a store together with its manifest); None when there is no such entry."""
    folder = Path(folder)
    manifest = folder.parent / MANIFEST_FILE
    return load_manifest(manifest).find(folder.name) if manifest.is_file() else None


def lora_spec_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return {"r": cfg["r"], "alpha": cfg["lora_alpha"], "target_modules": targets}


class AdapterStore:
    """The adapter store at `root` (default `attune.paths.STORE_DIR`).

    With `public_key` (a PEM file, see adapters.signing) every read of the manifest first checks its Ed25519
    signature, so `manifest`, `list`, `get`, `scorer` and `verify_all` raise SignatureError for a store that is not
    signed by that key or changed since; serving always passes one. Writers never check it and never sign: they keep
    the old signature, which is then stale until `attune adapters sign` (`sign`) signs the manifest again.
    """

    def __init__(self, root: Path | None = None, public_key: str | Path | None = None):
        if root is None:
            from attune.paths import STORE_DIR

            root = STORE_DIR
        self.root = Path(root)
        self.public_key_path = Path(public_key) if public_key is not None else None
        self.public_key = None if public_key is None else load_public_key(public_key)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def manifest(self) -> StoreManifest:
        """The manifest (a copy the caller may change), after checking its signature when the store has a public
        key."""
        return self._read().model_copy(deep=True)

    def snapshot(self) -> StoreManifest:
        """The manifest as last read (checked as `manifest` checks it), shared: read it, never change it. No copy is
        made (a deep copy of a 13-adapter manifest costs ~0.5 ms, and the ingress routes on every chat turn)."""
        return self._read()

    def _read(self) -> StoreManifest:
        """The manifest as last read, shared and never changed: checked and parsed again only when the file's bytes
        changed (the ingress reads it on every chat turn; the signature check and parsing cost ~1 ms, the read
        ~0.01 ms)."""
        try:
            raw = self.manifest_path.read_bytes()
        except OSError:
            raw = None
        cached = self.__dict__.get("_cache")
        if raw is not None and cached is not None and cached[0] == raw:
            return cached[1]
        if self.public_key is None:
            m = load_manifest(self.manifest_path)
        else:
            data = read_manifest_data(self.manifest_path)
            verify_data(data, self.public_key, self.root, self.public_key_path)
            m = parse_manifest(data, str(self.manifest_path))
        if raw is not None:
            self._cache = (raw, m)
        return m

    def verify_signature(self) -> ManifestSignature:
        """The manifest's signature, checked with the store's public key; SignatureError saying what is wrong."""
        if self.public_key is None:
            raise ValueError("this AdapterStore has no public key to check a signature with; pass public_key=")
        return verify_data(read_manifest_data(self.manifest_path), self.public_key, self.root, self.public_key_path)

    def sign(self, private_key: Ed25519PrivateKey) -> ManifestSignature:
        """Sign the manifest as it is now (rewritten in canonical form first); the caller checks the files first."""
        with self._locked():
            m = load_manifest(self.manifest_path)
            m.signature = None
            m.signature = sign_data(json.loads(dumps(m)), private_key)
            save_manifest(m, self.manifest_path)
        return m.signature

    def _save(self, m: StoreManifest) -> None:
        """Write a changed manifest; a signature it carried no longer matches (the warning says what to run)."""
        save_manifest(m, self.manifest_path)
        if m.signature is not None and self.root.resolve() not in _WARNED:
            _WARNED.add(self.root.resolve())
            log.warning("%s changed, so its signature is stale and serving refuses the store until you check it with "
                        "`attune adapters verify --store %s` and sign it again with `attune adapters sign --store %s "
                        "--key PRIVATE_KEY_FILE`", self.manifest_path, self.root, self.root)

    def list(self) -> list[AdapterManifest]:
        return sorted(self.manifest().adapters, key=lambda a: a.id)

    def ids(self) -> list[str]:
        return sorted(a.id for a in self._read().adapters)

    def entry(self, adapter_id: str) -> AdapterManifest:
        """The manifest entry for `adapter_id`, without checking its files."""
        m = self.manifest()
        found = m.find(adapter_id)
        if found is None:
            raise UnknownAdapter(adapter_id, sorted(a.id for a in m.adapters))
        return found

    def path(self, adapter_id: str) -> Path:
        return self.root / adapter_id

    def get(self, adapter_id: str) -> Path:
        """The adapter's folder, after checking every file against the manifest's sha256 allowlist."""
        entry = self.entry(adapter_id)
        verify(self.path(adapter_id), entry.files)
        return self.path(adapter_id)

    def profile(self, name: str) -> Preference:
        return self.manifest().profile(name)

    def verify_all(self) -> dict[str, IntegrityError]:
        """Check every adapter and every registered scorer (reward, judge); returns {id: error} for those that fail
        (empty when all pass)."""
        failures = {}
        m = self.manifest()
        for folder, files in [*((e.id, e.files) for e in sorted(m.adapters, key=lambda a: a.id)), *m.scorers.items()]:
            try:
                verify(self.path(folder), files)
            except IntegrityError as e:
                failures[folder] = e
        return failures

    def register_scorer(self, name: str) -> dict[str, str]:
        """Record the sha256 of every file of the store's `name` folder (reward or judge) in the manifest."""
        if name not in RESERVED_IDS:
            raise ValueError(f"{name!r} is not a scorer folder; use one of {RESERVED_IDS}")
        files = hash_folder(self.path(name))
        with self._locked():
            m = load_manifest(self.manifest_path)
            m.scorers[name] = files
            self._save(m)
        return files

    def scorer(self, name: str) -> Path:
        """The reward model or judge folder, after checking its files against the manifest's allowlist."""
        expected = self.manifest().scorers.get(name)
        if not expected:
            raise IntegrityError(self.path(name), detail=f"the manifest has no sha256 allowlist for {name!r}; "
                                 f"register it with AdapterStore.register_scorer({name!r}) after training")
        verify(self.path(name), expected)
        return self.path(name)

    def add(self, folder: Path, entry: AdapterManifest | Mapping[str, Any], *, copy: bool = True,
            expected_files: Mapping[str, str] | None = None) -> AdapterManifest:
        """Register a PEFT LoRA folder under `entry['id']`, hashing its files into `entry.files`.

        `entry` is an AdapterManifest or a mapping without `files` (computed here); `lora` may be left
        out and is then read from adapter_config.json, otherwise it must agree with it. With
        copy=True the folder is copied to `<root>/<id>/`; with copy=False it must already be there.
        `expected_files` is the sha256 allowlist the folder arrived with (e.g. `carried_entry(folder).files`):
        the folder must match it exactly, else IntegrityError and nothing is registered.
        """
        folder = Path(folder)
        data = entry.model_dump() if isinstance(entry, AdapterManifest) else dict(entry)
        if data.get("files"):
            raise ValueError("leave `files` out of the entry: the store hashes the folder itself")
        cfg = read_lora_config(folder)
        if expected_files is not None:
            verify(folder, expected_files)
        spec = lora_spec_from_config(cfg)
        data.setdefault("lora", spec)
        data["files"] = hash_folder(folder)
        try:
            new = AdapterManifest.model_validate(data)
        except ValidationError as e:
            raise ManifestError(f"adapter entry for {folder} is invalid:\n{format_errors(e)}") from None
        if new.id in RESERVED_IDS:
            raise ValueError(f"adapter id {new.id!r} names the store's {new.id} model folder; pick another id")
        if (new.lora.r, float(new.lora.alpha)) != (spec["r"], float(spec["alpha"])):
            raise ManifestError(f"entry lora r={new.lora.r}, alpha={new.lora.alpha} disagrees with "
                                f"{folder}/adapter_config.json (r={spec['r']}, lora_alpha={spec['alpha']}); "
                                "leave `lora` out to take it from the config")
        dest = self.path(new.id)
        with self._locked():
            m = load_manifest(self.manifest_path)
            if m.find(new.id) is not None:
                raise ValueError(f"adapter id {new.id!r} is already in the store; remove it first or pick another id")
            if copy:
                if dest.exists():
                    raise FileExistsError(f"{dest} exists but is not registered; delete it or pick another id")
                _copy_folder(folder, dest)
                try:
                    verify(dest, new.files)
                except IntegrityError:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
            elif folder.resolve() != dest.resolve():
                raise ValueError(f"with copy=False the folder must already be {dest}, not {folder}; "
                                 "pass copy=True to copy it in")
            m.adapters.append(new)
            self._save(m)
        return new

    def update_eval(self, adapter_id: str, scores: Mapping[str, Any]) -> AdapterManifest:
        """Merge evaluation scores into the entry's `eval` (files and checksums are untouched)."""
        with self._locked():
            m = load_manifest(self.manifest_path)
            entry = m.find(adapter_id)
            if entry is None:
                raise UnknownAdapter(adapter_id, sorted(a.id for a in m.adapters))
            entry.eval = {**entry.eval, **dict(scores)}
            self._save(m)
        return entry

    def remove(self, adapter_id: str) -> None:
        """Drop the entry (manifest first, atomically), then delete the folder."""
        if adapter_id in RESERVED_IDS:
            raise ValueError(f"{adapter_id!r} is the store's {adapter_id} model, not an adapter; it cannot be removed")
        with self._locked():
            m = load_manifest(self.manifest_path)
            if m.find(adapter_id) is None:
                raise UnknownAdapter(adapter_id, sorted(a.id for a in m.adapters))
            m.adapters = [a for a in m.adapters if a.id != adapter_id]
            self._save(m)
            shutil.rmtree(self.path(adapter_id), ignore_errors=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with file_lock("attune-store", str(self.root.resolve())):
            yield


def _copy_folder(src: Path, dest: Path) -> None:
    """Copy into a temporary sibling, then rename, so `dest` never holds a partial copy."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(src, tmp / "x", symlinks=True)
        os.replace(tmp / "x", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
