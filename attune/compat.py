"""Checks for third-party name clashes, written so they import nothing that might be the clash.

PyPI's AdapterHub package is also imported as `adapters`; Attune's adapter store is the package
of that name in this repository and carries the marker `ATTUNE_ADAPTERS = True`.
"""
from __future__ import annotations

from types import ModuleType


def check_adapters_package(module: ModuleType | None) -> ModuleType:
    """Return `module` if it is Attune's `adapters` package; otherwise raise ImportError saying how to fix it."""
    if module is not None and getattr(module, "ATTUNE_ADAPTERS", False) is True:
        return module
    where = getattr(module, "__file__", None) or "<not imported>"
    raise ImportError(
        f"`import adapters` gave {where}, which is not Attune's adapter store (no ATTUNE_ADAPTERS "
        "marker). It is probably PyPI's AdapterHub package, which uses the same name: run "
        "`pip uninstall adapters` and reinstall Attune (`pip install -e .`), or put the Attune "
        "checkout first on sys.path / PYTHONPATH."
    )


def import_adapters() -> ModuleType:
    """Import `adapters` and check that it is Attune's."""
    import adapters

    return check_adapters_package(adapters)


def refuse_adapterhub() -> None:
    """The guard `attune train`, `attune serve` and the Serve replicas run before anything else: raise ImportError
    (saying how to fix it) if `import adapters` is not Attune's store or PyPI's AdapterHub is installed beside it."""
    import_adapters().ensure_attune_adapters()
