"""`attune adapters keygen / sign` and the signature line of `attune adapters verify`: the operator's Ed25519 key
pair and its signature over the store's manifest (adapters.signing). The private key never goes into the repository
or the store; serving checks with the public key (ServeConfig.adapter_public_key)."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def public_key_path(public_key: str | None = None) -> Path | None:
    """--public-key, else $ATTUNE_ADAPTER_PUBLIC_KEY, else the shipped key; 'none' means no signature check."""
    from adapters.signing import PUBLIC_KEY_ENV
    from attune.paths import ADAPTER_PUBLIC_KEY

    value = public_key or os.environ.get(PUBLIC_KEY_ENV) or str(ADAPTER_PUBLIC_KEY)
    return None if value.lower() in ("none", "null") else Path(value)


def signature_report(root: Path, public_key: str | None = None) -> bool:
    """Print one line on the store's signature; False when it does not verify."""
    from adapters.registry import AdapterStore
    from adapters.signing import SignatureError, SigningKeyError

    path = public_key_path(public_key)
    if path is None:
        print("signature: not checked (no public key configured)")
        return True
    try:
        sig = AdapterStore(root, public_key=path).verify_signature()
    except (SignatureError, SigningKeyError) as e:
        print(f"FAILED signature: {e}")
        return False
    print(f"signature: valid, key {sig.key_id} ({path}), signed {sig.signed_at}")
    return True


def adapters_sign(store: str | None = None, key: str | None = None) -> int:
    """Sign the store's manifest with the operator's Ed25519 private key, after checking every file's sha256."""
    from adapters.registry import AdapterStore
    from adapters.signing import SigningKeyError, key_id, load_private_key, load_public_key
    from attune.paths import STORE_DIR

    s = AdapterStore(Path(store) if store else STORE_DIR)
    try:
        private = load_private_key(key)
    except SigningKeyError as e:
        print(f"attune adapters sign: {e}", file=sys.stderr)
        return 2
    failures = s.verify_all()
    for adapter_id, err in failures.items():
        print(f"FAILED {adapter_id}: {err}")
    if failures:
        print(f"attune adapters sign: refused: {len(failures)} folder(s) do not match their sha256; restore them or "
              "register them again, then sign", file=sys.stderr)
        return 1
    sig = s.sign(private)
    m = s.manifest()
    print(f"signed {s.manifest_path} with key {sig.key_id}: {len(m.adapters)} adapters, {len(m.scorers)} scorers, "
          f"manifest sha256 {sig.manifest_sha256}")
    trusted = public_key_path()
    if trusted is not None and trusted.is_file() and key_id(load_public_key(trusted)) != sig.key_id:
        print(f"note: serving trusts key {key_id(load_public_key(trusted))} ({trusted}), not {sig.key_id}: set "
              "adapter_public_key or $ATTUNE_ADAPTER_PUBLIC_KEY to this key's public half")
    return 0


def adapters_keygen(private_key: str | None = None, public_key: str | None = None) -> int:
    """Create an Ed25519 key pair for signing the store: the private key (mode 0600) and its public key."""
    from adapters.signing import generate_key_pair

    if not private_key:
        print("attune adapters keygen: give the private key's path, outside the repository and the store: "
              "attune adapters keygen FILE [--public FILE.pub]", file=sys.stderr)
        return 2
    try:
        priv, pub, kid = generate_key_pair(private_key, public_key)
    except (FileExistsError, ValueError) as e:
        print(f"attune adapters keygen: refused: {e}", file=sys.stderr)
        return 1
    print(f"key {kid}: private key {priv} (mode 600; keep it off the serving machines), public key {pub}")
    print(f"next: attune adapters sign --key {priv}; serve with adapter_public_key: {pub} "
          f"(or ATTUNE_ADAPTER_PUBLIC_KEY={pub})")
    return 0
