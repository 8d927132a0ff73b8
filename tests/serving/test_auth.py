"""API keys (hashed, constant-time checked), the local default tenant's key file, and the rate limiter."""
from __future__ import annotations

import hashlib
import stat
import sys
import threading

import pytest
from sqlalchemy import select

from serving.auth import (KEY_PREFIX, AuthError, KeyStore, RateLimited, RateLimiter, hash_key, new_key)
from serving.db import ApiKey, Repository


@pytest.fixture()
def keys(tmp_path):
    repo = Repository(f"sqlite:///{tmp_path / 'attune.db'}")
    yield KeyStore(repo)
    repo.close()


def stored_hashes(store: KeyStore) -> list[str]:
    with store.repo._tx.begin() as s:
        return list(s.scalars(select(ApiKey.key_hash)))


def test_key_round_trip_and_wrong_keys(keys):
    key = keys.create_key("clinic-a", "patient-app")
    op = keys.create_key("clinic-a", "operator")
    assert key.startswith(KEY_PREFIX) and len(key) > 40 and key != op
    assert keys.authenticate(f"Bearer {key}").tenant_id == "clinic-a"
    assert keys.authenticate(key).role == "patient-app" and not keys.authenticate(key).is_operator
    assert keys.authenticate(f"bearer  {op}").is_operator
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), new_key(), "Bearer ", ""):
        with pytest.raises(AuthError):
            keys.authenticate(bad)
    with pytest.raises(AuthError, match="Authorization: Bearer"):
        keys.authenticate(None)


def test_a_valid_key_is_remembered_for_a_while_and_a_revoked_one_stops_working_after_it(keys):
    from serving.auth import AUTH_CACHE_S

    now = [1000.0]
    store = KeyStore(keys.repo, clock=lambda: now[0])
    key = store.create_key("clinic-a", "patient-app")
    assert store.cached(f"Bearer {key}") is None  # never checked yet: the caller asks the database
    principal = store.authenticate(f"Bearer {key}")
    assert store.cached(key) == principal and store.cached(f"bearer {key}") == principal
    assert store.cached(new_key()) is None and store.cached(None) is None and store.cached("") is None
    keys.repo.revoke_api_keys("clinic-a", "", keep_hash="")  # revoked in the database by another replica
    now[0] += AUTH_CACHE_S - 1
    assert store.cached(key) == principal
    now[0] += 1
    assert store.cached(key) is None
    with pytest.raises(AuthError):
        store.authenticate(key)
    assert store.cached(key) is None


def test_remembered_keys_are_bounded(keys, monkeypatch):
    import serving.auth as auth

    monkeypatch.setattr(auth, "AUTH_CACHE_KEYS", 2)
    first, *rest = [keys.create_key("clinic-a") for _ in range(3)]
    for k in [first, *rest]:
        keys.authenticate(k)
    assert keys.cached(first) is None and all(keys.cached(k) is not None for k in rest)


def test_only_the_hash_is_stored(keys):
    key = keys.create_key("clinic-a")
    hashes = stored_hashes(keys)
    assert hashes == [hashlib.sha256(key.encode()).hexdigest()] == [hash_key(key)]
    assert key not in hashes[0]


def test_default_tenant_key_file_is_private_and_reused(keys, tmp_path, monkeypatch):
    monkeypatch.delenv("ATTUNE_API_KEY", raising=False)
    monkeypatch.delenv("ATTUNE_OPERATOR_KEY", raising=False)
    data = tmp_path / "serve"
    key, path = keys.ensure_default_tenant(data)
    assert path == data / "api_key" and path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data / "operator_key").stat().st_mode) == 0o600
    assert keys.authenticate(key).tenant_id == "default"
    assert keys.authenticate((data / "operator_key").read_text().strip()).is_operator

    assert keys.ensure_default_tenant(data) == (key, path)
    assert len(stored_hashes(keys)) == 2


def test_environment_keys_replace_the_file_key(keys, tmp_path, monkeypatch):
    data = tmp_path / "serve"
    monkeypatch.delenv("ATTUNE_OPERATOR_KEY", raising=False)
    monkeypatch.delenv("ATTUNE_API_KEY", raising=False)
    file_key, _ = keys.ensure_default_tenant(data)

    env_key, op_key = new_key(), new_key()
    monkeypatch.setenv("ATTUNE_API_KEY", env_key)
    monkeypatch.setenv("ATTUNE_OPERATOR_KEY", op_key)
    assert keys.ensure_default_tenant(data) == (env_key, None)
    assert keys.authenticate(env_key).role == "patient-app"
    assert keys.authenticate(op_key).role == "operator"
    with pytest.raises(AuthError):
        keys.authenticate(file_key)

    monkeypatch.delenv("ATTUNE_API_KEY")
    assert keys.ensure_default_tenant(data)[0] == file_key
    assert keys.authenticate(file_key).tenant_id == "default"
    with pytest.raises(AuthError):
        keys.authenticate(env_key)
    with pytest.raises(ValueError, match="at least 24"):
        keys.ensure_default_tenant(data, env_key="hunter2")
    with pytest.raises(ValueError, match="registered for tenant 'default' as operator"):
        keys.ensure_default_tenant(data, env_key=op_key)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_blocks_the_extra_request_and_recovers():
    clock = FakeClock()
    limiter = RateLimiter(6, clock=clock)
    for _ in range(6):
        limiter.check("k1")
    with pytest.raises(RateLimited) as exc:
        limiter.check("k1")
    assert exc.value.retry_after == pytest.approx(10.0)
    assert exc.value.retry_after_header == "10"
    limiter.check("k2")
    clock.now += exc.value.retry_after - 0.5
    with pytest.raises(RateLimited) as again:
        limiter.check("k1")
    assert 0 < again.value.retry_after <= 0.5 + 1e-9 and again.value.retry_after_header == "1"
    clock.now += again.value.retry_after
    limiter.check("k1")
    with pytest.raises(RateLimited):
        limiter.check("k1")
    RateLimiter(0, clock=clock).check("anyone")


def test_rate_limiter_memory_is_bounded():
    clock = FakeClock()
    limiter = RateLimiter(60, max_keys=3, clock=clock)
    for i in range(10):
        limiter.check(f"k{i}")
    assert len(limiter) == 3
    clock.now += 61
    limiter.check("fresh")
    assert len(limiter) == 1


def test_rate_limiter_is_thread_safe():
    limiter = RateLimiter(400, clock=FakeClock())
    allowed = []

    def hammer():
        for _ in range(200):
            try:
                limiter.check("shared")
                allowed.append(1)
            except RateLimited:
                pass

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert len(allowed) == 400


def test_the_full_hash_is_compared_here_in_constant_time_never_by_the_database(keys, monkeypatch):
    """The database matches only a prefix of the hash; every candidate's stored hash is compared with the presented
    key's hash by hmac.compare_digest. A row that shares the prefix but not the hash is refused."""
    import hmac

    from sqlalchemy import event

    from serving import auth

    key = keys.create_key("clinic-a")
    digest = hash_key(key)
    twin = digest[:auth.LOOKUP_CHARS] + ("0" if digest[-1] != "0" else "1") * (64 - auth.LOOKUP_CHARS)
    keys.repo.ensure_tenant("mallory")
    keys.repo.put_api_key("mallory", twin, "operator", "twin")
    sent, compared = [], []
    event.listen(keys.repo.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, params, context, many: sent.append(repr(params)))
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))

    who = keys.authenticate(key)
    assert who.tenant_id == "clinic-a" and who.role == "patient-app"
    assert sorted(compared) == sorted([(digest, digest), (twin, digest)])
    assert sent and not any(digest in p or twin in p for p in sent), "the database saw a full hash"

    compared.clear()
    with pytest.raises(AuthError):  # a key whose hash matches only the twin's prefix
        keys.authenticate(new_key())
    keys.repo.revoke_api_keys("clinic-a", "")
    with pytest.raises(AuthError):
        keys.authenticate(key)
    assert compared == [(twin, digest)]
