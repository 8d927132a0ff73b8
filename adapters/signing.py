"""Ed25519 signatures over the adapter store's manifest: whoever can write the store can re-hash a changed adapter,
but only the operator's private key can sign the result, and serving checks it with a public key kept outside the
store (`attune.paths.ADAPTER_PUBLIC_KEY` or `ServeConfig.adapter_public_key`).

The signature covers the whole manifest except its `signature` field (every file hash, routing weight, eval score,
scorer allowlist and profile), as canonical JSON, so any writer's change leaves it stale until signed again.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import ValidationError

from adapters.integrity import IntegrityError
from adapters.manifest import MANIFEST_FILE, ManifestSignature, format_errors

SIGNING_KEY_ENV = "ATTUNE_ADAPTER_SIGNING_KEY"
"""The operator's private key for `attune adapters sign` when --key is not given: a file path or the PEM itself."""
PUBLIC_KEY_ENV = "ATTUNE_ADAPTER_PUBLIC_KEY"
"""The public key serving and `attune adapters verify` check the manifest with (ServeConfig.adapter_public_key)."""
_DOMAIN = b"attune adapter manifest signature v1\n"


class SignatureError(IntegrityError):
    """A store manifest whose signature is missing, by another key, invalid or stale; the message says which and
    what to run."""

    def __init__(self, root: Path, message: str):
        Exception.__init__(self, f"adapter store {root} refused: {message}")
        self.folder, self.missing, self.extra, self.changed = Path(root), [], [], []


class SigningKeyError(ValueError):
    """A key file that cannot be read or is not an Ed25519 key; the message names the file and the fix."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's JSON without `signature`: sorted keys, no whitespace, so formatting does not count."""
    body = {k: v for k, v in data.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def signed_message(manifest_sha256: str, signed_at: str) -> bytes:
    return _DOMAIN + manifest_sha256.encode("ascii") + b"\n" + signed_at.encode("utf-8")


def sign_data(data: Mapping[str, Any], private_key: Ed25519PrivateKey) -> ManifestSignature:
    digest, when = canonical_digest(data), datetime.now(timezone.utc).isoformat(timespec="seconds")
    value = base64.b64encode(private_key.sign(signed_message(digest, when))).decode("ascii")
    return ManifestSignature(key_id=key_id(private_key.public_key()), manifest_sha256=digest, signed_at=when,
                             value=value)


def _resign_hint(root: Path) -> str:
    return (f"check the files with `attune adapters verify --store {root}`, then sign the manifest with "
            f"`attune adapters sign --store {root} --key PRIVATE_KEY_FILE` (or ${SIGNING_KEY_ENV})")


def verify_data(data: Mapping[str, Any] | None, public_key: Ed25519PublicKey, root: Path,
                public_key_path: Path | None = None) -> ManifestSignature:
    """The manifest's signature if `public_key` made it over exactly this content; SignatureError naming the problem
    (not signed, another key, invalid, or the manifest changed after signing) otherwise."""
    root, expected = Path(root), key_id(public_key)
    trusted = f"key {expected}" + (f" ({public_key_path})" if public_key_path else "")
    if data is None:
        raise SignatureError(root, f"there is no {MANIFEST_FILE}, so nothing is signed by the trusted {trusted}")
    raw = data.get("signature")
    if raw is None:
        raise SignatureError(root, f"{MANIFEST_FILE} is not signed, and serving trusts only a manifest signed by "
                             f"{trusted}; {_resign_hint(root)}")
    try:
        sig = ManifestSignature.model_validate(raw)
    except ValidationError as e:
        raise SignatureError(root, f"the signature in {MANIFEST_FILE} is malformed:\n{format_errors(e)}\n"
                             f"{_resign_hint(root)}") from None
    if sig.key_id != expected:
        raise SignatureError(root, f"{MANIFEST_FILE} is signed by key {sig.key_id}, not by the trusted {trusted}: sign "
                             f"it with the private key of that public key (`attune adapters sign --store {root} --key "
                             f"PRIVATE_KEY_FILE`), or point adapter_public_key / ${PUBLIC_KEY_ENV} at the public key "
                             "you signed with")
    try:
        public_key.verify(base64.b64decode(sig.value, validate=True), signed_message(sig.manifest_sha256, sig.signed_at))
    except (InvalidSignature, ValueError):
        raise SignatureError(root, f"the signature in {MANIFEST_FILE} does not verify with the trusted {trusted}: it "
                             "is forged or corrupted; restore the store from a trusted copy, or re-sign it: "
                             f"{_resign_hint(root)}") from None
    digest = canonical_digest(data)
    if digest != sig.manifest_sha256:
        raise SignatureError(root, f"{MANIFEST_FILE} changed after it was signed on {sig.signed_at} (content sha256 "
                             f"{digest[:12]}, signed {sig.manifest_sha256[:12]}): an adapter or model was trained, "
                             "added, merged, evaluated or removed since, or someone tampered with the store. If every "
                             f"change is yours, {_resign_hint(root)}; otherwise restore the store from a trusted copy")
    return sig


# ---------------------------------------------------------------- keys
def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    fix = (f"set adapter_public_key (or ${PUBLIC_KEY_ENV}) to the operator's Ed25519 public key, as written by "
           "`attune adapters keygen`")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise SigningKeyError(f"adapter signing public key {path} does not exist; {fix}") from None
    except (ValueError, TypeError, OSError) as e:
        raise SigningKeyError(f"{path} is not a PEM public key ({e}); {fix}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key; {fix}")
    return key


def load_private_key(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey:
    """The operator's private key from `path`, else ${SIGNING_KEY_ENV} (a path, or the PEM text itself). A key file
    that group or others may read is refused, as ssh does."""
    env = os.environ if environ is None else environ
    fix = f"pass --key FILE or set ${SIGNING_KEY_ENV} (create a pair with `attune adapters keygen FILE`)"
    source = str(path) if path else env.get(SIGNING_KEY_ENV, "")
    if not source:
        raise SigningKeyError(f"no private signing key given; {fix}")
    if source.lstrip().startswith("-----BEGIN"):
        pem, where = source.encode(), f"${SIGNING_KEY_ENV}"
    else:
        file = Path(source)
        try:
            mode = file.stat().st_mode
        except FileNotFoundError:
            raise SigningKeyError(f"private signing key {file} does not exist; {fix}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SigningKeyError(f"private signing key {file} is readable by others (mode {stat.S_IMODE(mode):o}); "
                            f"run `chmod 600 {file}`")
        pem, where = file.read_bytes(), str(file)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise SigningKeyError(f"{where} is not an unencrypted PEM private key ({e}); {fix}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{where} holds a {type(key).__name__}, not an Ed25519 private key; {fix}")
    return key


def generate_key_pair(private_path: str | Path, public_path: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write a new Ed25519 pair: the private key (PKCS8 PEM, mode 0600, never overwritten) and the public key
    (SubjectPublicKeyInfo PEM, default: the private path with suffix .pub). Returns (private, public, key id)."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_suffix(".pub")
    if private_path.resolve() == public_path.resolve():
        raise ValueError(f"the public key needs a path of its own, not {private_path}")
    for p in (private_path, public_path):
        if p.exists():
            raise FileExistsError(f"{p} exists; keys are never overwritten: delete it first or choose another path")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(private_path, 0o600)  # whatever the umask
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path, key_id(key.public_key())
