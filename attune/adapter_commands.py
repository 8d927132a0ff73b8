"""`attune adapters list|verify|add|remove|extrapolate`: the adapter store from the command line (sign and keygen
live in `attune.store_signing`)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from attune.store_signing import signature_report


def adapters_list(store: str | None = None) -> int:
    """List the adapters in the store with their weights and recipe."""
    from adapters.registry import AdapterStore
    from attune.paths import STORE_DIR

    s = AdapterStore(Path(store) if store else STORE_DIR)
    for m in s.list():
        w = " ".join(f"{k[:4]}={v:.2f}" for k, v in m.weights.items())
        print(f"{m.id:28s} {m.recipe:9s} {w}")
    return 0


def adapters_verify(store: str | None = None, public_key: str | None = None) -> int:
    """Verify every adapter's files against the sha256 recorded in the manifest, and the manifest's signature."""
    from adapters.registry import AdapterStore
    from attune.paths import STORE_DIR

    s = AdapterStore(Path(store) if store else STORE_DIR)
    failures = s.verify_all()
    for adapter_id, err in failures.items():
        print(f"FAILED {adapter_id}: {err}")
    print(f"{len(s.list()) - len(failures)} of {len(s.list())} adapters verified")
    signed = signature_report(s.root, public_key)
    return 1 if failures or not signed else 0


def _preference_arg(values: list[str]) -> dict[str, float]:
    """--weights as one JSON object or objective=weight pairs; objectives left out weigh 0."""
    from alignment.objectives import OBJECTIVES

    if len(values) == 1 and values[0].lstrip().startswith("{"):
        try:
            given = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"--weights is not valid JSON ({e.msg}); write e.g. '{{\"empathy\": 0.7, "
                             f"\"safety\": 0.3}}' or empathy=0.7 safety=0.3") from None
    else:
        given = {}
        for item in values:
            name, sep, weight = item.partition("=")
            try:
                if not sep:
                    raise ValueError(item)
                given[name.strip()] = float(weight)
            except ValueError:
                raise ValueError(f"--weights {item!r}: write objective=weight with a number, e.g. "
                                 "empathy=0.7") from None
    if not isinstance(given, dict):
        raise ValueError("--weights JSON must be an object mapping objective -> weight")
    return {**{o: 0.0 for o in OBJECTIVES}, **given}


def adapters_add(path: str | None = None, adapter_id: str | None = None, recipe: str | None = None,
                 weights: list[str] | None = None, base_model: str | None = None,
                 primary_objective: str | None = None, data_hash: str | None = None,
                 store: str | None = None) -> int:
    """Add a LoRA folder to the store after checking its checksums and manifest entry; refuses (exit 2) otherwise.

    A folder copied out of another store together with that store's manifest.json (PATH/../manifest.json lists
    PATH's name) keeps its entry and must match the entry's sha256 allowlist byte for byte; flags override single
    fields. Any other folder is unknown until given --id, --recipe and --weights; its files are hashed on entry."""
    from adapters.integrity import IntegrityError
    from adapters.manifest import ManifestError
    from adapters.registry import AdapterStore, carried_entry
    from alignment.basemodel import DEFAULT_BASE
    from attune.paths import STORE_DIR

    if not path:
        print("attune adapters add: give the adapter folder: attune adapters add PATH [--id ID --recipe R "
              "--weights ...]", file=sys.stderr)
        return 2
    folder, s = Path(path), AdapterStore(Path(store) if store else STORE_DIR)
    try:
        carried = carried_entry(folder)
        given = {"id": adapter_id, "recipe": recipe, "weights": _preference_arg(weights) if weights else None,
                 "base_model": base_model, "primary_objective": primary_objective, "data_hash": data_hash}
        given = {k: v for k, v in given.items() if v is not None}
        if carried is None:
            missing = [f"--{k}" for k in ("id", "recipe", "weights") if k not in given]
            if missing:
                raise ValueError(f"{folder} carries no manifest entry ({folder.parent / 'manifest.json'} does not "
                                 f"list {folder.name!r}), so it is unknown; pass {' '.join(missing)} to register "
                                 "it as a new adapter")
            entry = {"base_model": DEFAULT_BASE, "data_hash": "", **given}
        else:
            entry = {**carried.model_dump(exclude={"files"}), **given}
        inside = folder.resolve().parent == s.root.resolve()
        new = s.add(folder, entry, copy=not inside, expected_files=carried.files if carried else None)
    except (IntegrityError, ManifestError, ValueError, OSError) as e:
        print(f"attune adapters add: refused: {e}", file=sys.stderr)
        return 2
    source = f"verified against {folder.parent / 'manifest.json'}" if carried else "hashed"
    print(f"added {new.id} ({new.recipe}, r={new.lora.r}; {len(new.files)} files {source}) to {s.root}")
    return 0


def adapters_remove(adapter_id: str | None = None, store: str | None = None) -> int:
    """Remove an adapter from the store: its manifest entry, then its folder (never the reward model or judge)."""
    from adapters.registry import AdapterStore, UnknownAdapter
    from attune.paths import STORE_DIR

    if not adapter_id:
        print("attune adapters remove: give the id of the adapter to remove (`attune adapters list` shows them)",
              file=sys.stderr)
        return 2
    s = AdapterStore(Path(store) if store else STORE_DIR)
    try:
        s.remove(adapter_id)
    except (UnknownAdapter, ValueError) as e:
        print(f"attune adapters remove: refused: {e}", file=sys.stderr)
        return 2
    print(f"removed {adapter_id} from {s.root}")
    return 0


def adapters_extrapolate(out: str | None = None, lam: float = 1.0, anchor: str = "modpo-balanced",
                         store: str | None = None) -> int:
    """Write a candidate store for `attune eval tune`: each MODPO adapter that emphasises an objective, pushed away
    from `anchor` (adapters.merge.extrapolate_store). Never the shipped store."""
    from adapters.integrity import IntegrityError
    from adapters.manifest import ManifestError
    from adapters.merge import MergeError, extrapolate_store
    from adapters.registry import AdapterStore, UnknownAdapter
    from alignment.basemodel import resolve
    from attune.paths import STORE_DIR
    from evals.stats import emphasised

    if not out:
        print("attune adapters extrapolate: give --out, a new folder for the candidate store", file=sys.stderr)
        return 2
    src = AdapterStore(Path(store) if store else STORE_DIR)
    if Path(out).resolve() == src.root.resolve() or (Path(out) / "manifest.json").exists():
        print(f"attune adapters extrapolate: refused: {out} already holds a store; choose a new folder",
              file=sys.stderr)
        return 2
    emphasis = sorted(emphasised(src.entry(i) for i in src.ids()).values())
    try:
        if not emphasis:
            raise ValueError(f"{src.root} has no MODPO adapter that emphasises an objective")
        base = resolve(src.entry(emphasis[0]).base_model)
        added = extrapolate_store(src, out, base, anchor, lam, emphasis)
    except (UnknownAdapter, IntegrityError, ManifestError, MergeError, ValueError, OSError) as e:
        print(f"attune adapters extrapolate: refused: {e}", file=sys.stderr)
        return 2
    for a in added:
        print(f"{a.id}: {1 + lam:g} x {a.id} - {lam:g} x {anchor} (r={a.lora.r})")
    print(f"wrote {len(added)} adapters to {out}; compare them with `attune eval tune {src.root} {out}`")
    return 0
