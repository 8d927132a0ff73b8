"""Attune's adapter store: manifest schema, registry, preference -> adapter matching, exact LoRA merges.

Knows nothing about HTTP or Ray. PyPI's AdapterHub package is also imported as `adapters`; if it is
installed it can shadow this one, so callers check with `attune.compat.check_adapters_package`.
"""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

ATTUNE_ADAPTERS = True

__all__ = [
    "ATTUNE_ADAPTERS",
    "AdapterManifest",
    "AdapterStore",
    "IntegrityError",
    "ManifestError",
    "NoRoutableAdapter",
    "SignatureError",
    "StoreManifest",
    "UnknownAdapter",
    "ensure_attune_adapters",
    "nearest_adapter",
]

_LAZY = {
    "AdapterManifest": "adapters.manifest",
    "StoreManifest": "adapters.manifest",
    "ManifestError": "adapters.manifest",
    "AdapterStore": "adapters.registry",
    "UnknownAdapter": "adapters.registry",
    "IntegrityError": "adapters.integrity",
    "SignatureError": "adapters.signing",
    "nearest_adapter": "adapters.matching",
    "NoRoutableAdapter": "adapters.matching",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")


def ensure_attune_adapters() -> None:
    """Raise ImportError if the imported `adapters` is not this package or AdapterHub's is installed too.

    Both distributions provide a top-level `adapters`, so which one imports depends on install order
    and sys.path; having AdapterHub installed at all is refused, even when this copy was found first.
    """
    import sys

    from attune.compat import check_adapters_package

    check_adapters_package(sys.modules.get("adapters"))
    try:
        dist = importlib.metadata.distribution("adapters")
    except importlib.metadata.PackageNotFoundError:
        return
    raise ImportError(
        f"PyPI's AdapterHub package `adapters` {dist.version} is installed and clashes with Attune's "
        f"`adapters` package at {Path(__file__).parent}: run `pip uninstall adapters`, then reinstall "
        "Attune (`pip install -e .`)"
    )
