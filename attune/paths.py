"""Where Attune keeps things: the repository's shipped artefacts and the user's cache directory."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = REPO_ROOT / "alignment" / "seed"
RECIPES_DIR = REPO_ROOT / "alignment" / "recipes"
STORE_DIR = REPO_ROOT / "adapters" / "store"
REWARD_DIR = STORE_DIR / "reward"
JUDGE_DIR = STORE_DIR / "judge"
ADAPTER_PUBLIC_KEY = REPO_ROOT / "attune" / "keys" / "adapter-signing.pub"
"""The operator's Ed25519 public key that the store's manifest must be signed with; shipped with the code, never in
the (writable) store."""
REPORTS_DIR = REPO_ROOT / "reports"
# Looked for beside the checkout; any other path can be given by flag.
DEFAULT_COUNSEL_CHAT = REPO_ROOT.parent / "shared" / "data" / "counsel_chat" / "counsel_chat.csv"


def cache_dir() -> Path:
    """`$ATTUNE_HOME`, else `~/.cache/attune`; created on first use."""
    d = Path(os.environ.get("ATTUNE_HOME", Path.home() / ".cache" / "attune"))
    d.mkdir(parents=True, exist_ok=True)
    return d
