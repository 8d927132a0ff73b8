"""The `adapters` name clash with PyPI's AdapterHub: the wrong package is refused with a fix."""
from __future__ import annotations

import importlib.metadata
import types

import pytest

import adapters
from attune.compat import check_adapters_package, import_adapters


def test_attune_package_accepted():
    assert check_adapters_package(adapters) is adapters and import_adapters() is adapters
    adapters.ensure_attune_adapters()
    assert adapters.AdapterStore.__module__ == "adapters.registry"


@pytest.mark.parametrize("module", [types.ModuleType("adapters"), None])
def test_wrong_package_refused(module):
    with pytest.raises(ImportError, match="pip uninstall adapters"):
        check_adapters_package(module)


def test_adapterhub_installed_beside_refused(monkeypatch):
    fake = types.SimpleNamespace(version="1.2.0")
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: fake if name == "adapters" else real(name))
    with pytest.raises(ImportError, match="AdapterHub package `adapters` 1.2.0"):
        adapters.ensure_attune_adapters()
