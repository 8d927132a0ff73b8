"""sha256 allowlists: every regular file is hashed, and any change, loss or addition is named."""
from __future__ import annotations

import os

import pytest

from adapters.integrity import IntegrityError, hash_folder, sha256_file, verify


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "ad"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "adapter_config.json").write_text("{}")
    (d / "sub" / ".hidden").write_text("x")
    return d


def test_hash_folder_is_every_file_sorted(folder):
    h = hash_folder(folder)
    assert list(h) == ["adapter_config.json", "adapter_model.safetensors", "sub/.hidden"]
    assert h["adapter_config.json"] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    assert h == hash_folder(folder)
    verify(folder, h)


def test_changed_byte_named(folder):
    expected = hash_folder(folder)
    p = folder / "adapter_model.safetensors"
    data = bytearray(p.read_bytes())
    data[500] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as exc:
        verify(folder, expected)
    assert exc.value.changed == ["adapter_model.safetensors"] and not exc.value.missing and not exc.value.extra
    assert "adapter_model.safetensors" in str(exc.value)


def test_missing_and_extra_named(folder):
    expected = hash_folder(folder)
    (folder / "sub" / ".hidden").unlink()
    (folder / "evil.py").write_text("import os")
    with pytest.raises(IntegrityError) as exc:
        verify(folder, expected)
    assert exc.value.missing == ["sub/.hidden"] and exc.value.extra == ["evil.py"]
    assert "sub/.hidden" in str(exc.value) and "evil.py" in str(exc.value)


def test_symlink_refused_and_empty_allowlist_refused(folder, tmp_path):
    expected = hash_folder(folder)
    os.symlink(tmp_path / "elsewhere", folder / "link")
    with pytest.raises(IntegrityError, match="link is not a regular file"):
        verify(folder, expected)
    with pytest.raises(IntegrityError, match="allowlist is empty"):
        verify(folder, {})


def test_sha256_file_streams(tmp_path):
    p = tmp_path / "big"
    p.write_bytes(b"a" * (3 << 20))
    import hashlib
    assert sha256_file(p) == hashlib.sha256(b"a" * (3 << 20)).hexdigest()
