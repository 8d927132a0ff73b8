"""`attune serve` and the Serve replicas' import path refuse PyPI's AdapterHub package (also imported as `adapters`),
as `attune train` does: run in a fresh interpreter with a fake AdapterHub on the path, installed beside Attune's
store or shadowing it. Nothing starts Ray: the guard runs before it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def adapterhub(root: Path, *, importable: bool) -> Path:
    """A folder holding the `adapters` distribution's metadata (as pip leaves it) and, if `importable`, its package
    (without Attune's ATTUNE_ADAPTERS marker)."""
    dist = root / "adapters-1.2.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: adapters\nVersion: 1.2.0\n")
    if importable:
        (root / "adapters").mkdir()
        (root / "adapters" / "__init__.py").write_text("__version__ = '1.2.0'\n")
    return root


def run(code: list[str], path: list[Path], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path)), "ATTUNE_HOME": str(tmp_path / "home"),
           "RAY_ADDRESS": "127.0.0.1:1"}  # were the guard to let it through, nothing could join a cluster
    return subprocess.run([sys.executable, *code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


SERVE = ["-m", "attune.cli", "serve", "--port", "1"]


def test_serve_refuses_adapterhub_installed_beside(tmp_path):
    hub = adapterhub(tmp_path / "site", importable=False)
    done = run(SERVE, [REPO, hub], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "attune serve: refused: PyPI's AdapterHub package `adapters` 1.2.0 is installed" in done.stderr
    assert "pip uninstall adapters" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists(), "nothing was set up before the refusal"


def test_serve_refuses_adapterhub_shadowing_attunes_store(tmp_path):
    hub = adapterhub(tmp_path / "site", importable=True)
    done = run(SERVE, [hub, REPO], tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"`import adapters` gave {hub / 'adapters' / '__init__.py'}" in done.stderr
    assert "not Attune's adapter store" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("importable", [False, True])
def test_replica_import_path_refuses_adapterhub(tmp_path, importable):
    """What a Serve replica (or `serve run deploy/serve-cpu.yaml`) imports first: serving.app."""
    hub = adapterhub(tmp_path / "site", importable=importable)
    done = run(["-c", "import serving.app"], [hub, REPO] if importable else [REPO, hub], tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "pip uninstall adapters" in last, last


def test_without_adapterhub_the_guard_passes(tmp_path):
    done = run(["-c", "import serving; from attune.compat import refuse_adapterhub; refuse_adapterhub(); "
                "print('ok')"], [REPO], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
