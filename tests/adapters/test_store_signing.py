"""The store manifest's Ed25519 signature: whoever can write the store can change an adapter and re-hash it in the
manifest, but without the operator's private key the result is refused wherever a public key is configured."""
from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from adapters.integrity import IntegrityError, sha256_file
from adapters.registry import AdapterStore
from adapters.signing import (SignatureError, SigningKeyError, generate_key_pair, key_id, load_private_key,
                              load_public_key)
from alignment.objectives import OBJECTIVES
from attune import cli
from lora_helpers import make_store


@pytest.fixture
def signed(tmp_path, signing_keys) -> tuple[AdapterStore, Path]:
    """A two-adapter store signed with the test key, and that key's public half."""
    private, public = signing_keys
    store = make_store(tmp_path / "store")
    store.sign(load_private_key(private))
    return store, public


def rehash(store: AdapterStore, adapter_id: str) -> None:
    """What an attacker with write access does after changing a file: recompute its sha256 in manifest.json,
    leaving the signature as it was."""
    data = json.loads(store.manifest_path.read_text())
    entry = next(a for a in data["adapters"] if a["id"] == adapter_id)
    entry["files"] = {rel: sha256_file(store.root / adapter_id / rel) for rel in entry["files"]}
    store.manifest_path.write_text(json.dumps(data, indent=2, sort_keys=True))


def test_a_signed_store_verifies_and_serves_its_adapters(signed, signing_keys):
    store, public = signed
    keyed = AdapterStore(store.root, public)
    sig = keyed.verify_signature()
    assert sig.key_id == key_id(load_public_key(public)) and sig.algorithm == "ed25519"
    assert keyed.get("warm") == store.root / "warm" and keyed.verify_all() == {}
    assert keyed.ids() == ["calm", "warm"]


def test_a_tampered_adapter_with_a_rehashed_manifest_is_refused(signed):
    store, public = signed
    weights = store.root / "warm" / "adapter_model.safetensors"
    weights.write_bytes(b"backdoor" + weights.read_bytes()[8:])
    rehash(store, "warm")
    assert store.get("warm"), "the sha256 check alone is fooled by the re-hashed manifest"
    keyed = AdapterStore(store.root, public)
    for load in (lambda: keyed.get("warm"), lambda: keyed.get("calm"), keyed.verify_signature, keyed.list):
        with pytest.raises(SignatureError, match=r"manifest.json changed after it was signed.*tampered.*"
                                                 r"attune adapters sign --store .* --key PRIVATE_KEY_FILE"):
            load()


def test_the_same_attack_through_the_store_api_is_refused_too(signed, tmp_path):
    """Removing the adapter and adding the changed folder is a legitimate-looking rewrite: still unsigned."""
    store, public = signed
    src = tmp_path / "src-warm"
    (src / "adapter_model.safetensors").write_bytes(b"other weights")
    store.remove("warm")
    store.add(src, {"id": "warm", "recipe": "modpo", "weights": {o: 1 / 6 for o in OBJECTIVES},
                    "base_model": "test", "data_hash": "sha256:test"})
    assert store.verify_all() == {}
    with pytest.raises(SignatureError, match="changed after it was signed"):
        AdapterStore(store.root, public).get("warm")


def test_a_changed_routing_weight_is_refused_like_a_changed_file(signed):
    store, public = signed
    data = json.loads(store.manifest_path.read_text())
    data["adapters"][0]["weights"] = {o: (1.0 if o == "empathy" else 0.0) for o in OBJECTIVES}
    store.manifest_path.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="changed after it was signed"):
        AdapterStore(store.root, public).list()


def test_reformatting_the_manifest_keeps_the_signature_valid(signed):
    store, public = signed
    data = json.loads(store.manifest_path.read_text())
    store.manifest_path.write_text(json.dumps(dict(reversed(list(data.items())))))
    AdapterStore(store.root, public).verify_signature()


def test_a_store_without_signature_is_refused_when_a_public_key_is_configured(tmp_path, signing_keys):
    store = make_store(tmp_path / "store")
    keyed = AdapterStore(store.root, signing_keys[1])
    with pytest.raises(SignatureError, match=r"manifest.json is not signed.*attune adapters sign"):
        keyed.get("warm")
    assert store.get("warm"), "without a public key the store is not checked"
    with pytest.raises(SignatureError, match="there is no manifest.json"):
        AdapterStore(tmp_path / "empty", signing_keys[1]).list()


def test_a_signature_by_another_key_is_refused(signed, tmp_path):
    store, public = signed
    other_private, other_public, other_id = generate_key_pair(tmp_path / "keys" / "other.key")
    store.sign(load_private_key(other_private))  # the attacker signs with a key of their own
    with pytest.raises(SignatureError, match=rf"signed by key {other_id}, not by the trusted key "
                                             rf"{key_id(load_public_key(public))}"):
        AdapterStore(store.root, public).get("warm")
    AdapterStore(store.root, other_public).get("warm")

    data = json.loads(store.manifest_path.read_text())  # ... and claims the trusted key's id
    data["signature"]["key_id"] = key_id(load_public_key(public))
    store.manifest_path.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="does not verify with the trusted key .* forged or corrupted"):
        AdapterStore(store.root, public).get("warm")


def test_a_malformed_signature_is_refused(signed):
    store, public = signed
    data = json.loads(store.manifest_path.read_text())
    data["signature"] = {"value": "abc"}
    store.manifest_path.write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="signature in manifest.json is malformed"):
        AdapterStore(store.root, public).list()


@pytest.mark.parametrize("write", [
    lambda s: s.update_eval("warm", {"judge": 4.0}),
    lambda s: s.register_scorer("reward"),
    lambda s: s.remove("calm"),
])
def test_every_writer_leaves_a_stale_signature_until_signed_again(signed, signing_keys, write, caplog):
    store, public = signed
    (store.root / "reward").mkdir()
    (store.root / "reward" / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="attune.adapters"):
        write(store)
    assert "signature is stale" in caplog.text and "attune adapters sign --store" in caplog.text
    with pytest.raises(SignatureError, match="changed after it was signed"):
        AdapterStore(store.root, public).verify_signature()
    store.sign(load_private_key(signing_keys[0]))
    AdapterStore(store.root, public).verify_signature()


def test_the_shipped_store_is_signed_by_the_shipped_public_key_kept_outside_it():
    from attune.paths import ADAPTER_PUBLIC_KEY, STORE_DIR

    assert STORE_DIR.resolve() not in ADAPTER_PUBLIC_KEY.resolve().parents
    store = AdapterStore(STORE_DIR, ADAPTER_PUBLIC_KEY)
    sig = store.verify_signature()
    assert sig.key_id == key_id(load_public_key(ADAPTER_PUBLIC_KEY))
    assert store.verify_all() == {} and store.scorer("reward") and store.scorer("crisis")


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path, monkeypatch):
    private, public, kid = generate_key_pair(tmp_path / "k" / "op.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public == tmp_path / "k" / "op.pub"
    assert key_id(load_private_key(private).public_key()) == kid == key_id(load_public_key(public))
    with pytest.raises(FileExistsError, match="never overwritten"):
        generate_key_pair(private)
    os.chmod(private, 0o644)
    with pytest.raises(SigningKeyError, match="readable by others.*chmod 600"):
        load_private_key(private)
    os.chmod(private, 0o600)
    monkeypatch.setenv("ATTUNE_ADAPTER_SIGNING_KEY", private.read_text())  # the PEM itself, e.g. a CI secret
    assert key_id(load_private_key().public_key()) == kid
    monkeypatch.delenv("ATTUNE_ADAPTER_SIGNING_KEY")
    with pytest.raises(SigningKeyError, match="no private signing key given.*--key FILE"):
        load_private_key()
    with pytest.raises(SigningKeyError, match="not an Ed25519 public key|not a PEM public key"):
        load_public_key(private)
    with pytest.raises(SigningKeyError, match="does not exist"):
        AdapterStore(tmp_path, tmp_path / "missing.pub")


def test_cli_keygen_sign_and_verify(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ATTUNE_ADAPTER_PUBLIC_KEY", raising=False)
    store = make_store(tmp_path / "store")
    key = tmp_path / "keys" / "op.key"
    assert cli.main(["adapters", "keygen", str(key)]) == 0
    assert "mode 600" in capsys.readouterr().out
    assert cli.main(["adapters", "keygen", str(key)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    pub = str(key.with_suffix(".pub"))

    assert cli.main(["adapters", "verify", "--store", str(store.root), "--public-key", pub]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 of 2 adapters verified" and out[1].startswith("FAILED signature:") and "not signed" in out[1]

    assert cli.main(["adapters", "sign", "--store", str(store.root), "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert "with key" in out and "2 adapters" in out and "serving trusts key" in out  # not the shipped key
    assert cli.main(["adapters", "verify", "--store", str(store.root), "--public-key", pub]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"signature: valid, key {key_id(load_public_key(pub))}")

    monkeypatch.setenv("ATTUNE_ADAPTER_PUBLIC_KEY", pub)  # how serving's setting reaches the command too
    weights = store.root / "calm" / "adapter_model.safetensors"
    weights.write_bytes(b"x" + weights.read_bytes()[1:])
    rehash(store, "calm")
    assert cli.main(["adapters", "verify", "--store", str(store.root)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 of 2 adapters verified" and "changed after it was signed" in out[1]

    weights.write_bytes(b"y" + weights.read_bytes()[1:])
    assert cli.main(["adapters", "sign", "--store", str(store.root), "--key", str(key)]) == 1
    assert "FAILED calm" in capsys.readouterr().out, "a store whose files do not match is never signed"
    assert cli.main(["adapters", "sign", "--store", str(store.root)]) == 2
    assert "--key FILE" in capsys.readouterr().err


def test_the_shipped_store_verifies_with_the_cli_default_key(capsys, monkeypatch):
    monkeypatch.delenv("ATTUNE_ADAPTER_PUBLIC_KEY", raising=False)
    assert cli.main(["adapters", "verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("signature: valid, key ")


def test_an_integrity_handler_also_catches_signature_errors():
    """The LLM replica turns IntegrityError into `adapter_refused`; a refused signature travels the same way."""
    assert issubclass(SignatureError, IntegrityError)
