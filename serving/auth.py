"""API keys and per-key rate limits: keys are stored as sha256 hashes and compared in constant time.

A key is 32 random bytes, so a fast hash is enough (a slow KDF only helps guessable secrets). The database is asked
only for the rows whose hash starts with the presented hash's first LOOKUP_CHARS characters; the full hashes are
compared here, in constant time (the database's own string comparison is not).
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

from sqlalchemy import select
from sqlalchemy.orm import Session

from serving.db import ROLES, RecordError, Repository, Role
from serving.records import ApiKey

KEY_PREFIX = "att-"
MIN_KEY_CHARS = 24
DEFAULT_TENANT = "default"
KEY_FILE = "api_key"
OPERATOR_KEY_FILE = "operator_key"
ENV_KEY, ENV_OPERATOR_KEY = "ATTUNE_API_KEY", "ATTUNE_OPERATOR_KEY"
LOOKUP_CHARS = 16
"""Hex characters of a key's hash that the database matches on (64 bits: a second row shares them by chance once in
~2**64 pairs); the rest is compared in constant time by `KeyStore.authenticate`."""


class AuthError(PermissionError):
    """Missing or unknown key (the API answers 401); the message says what to send."""


class RateLimited(Exception):
    """Too many requests for one key (429); `retry_after` is seconds until one more is allowed."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"rate limit reached; retry in {retry_after:.1f} s")

    @property
    def retry_after_header(self) -> str:
        """Whole seconds for the Retry-After header (at least 1)."""
        return str(max(1, math.ceil(self.retry_after)))


def hash_key(key: str) -> str:
    """sha256 hex of the key; keys are long random tokens, so no slow KDF is needed."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    role: Role
    key_id: int = 0

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


AUTH_CACHE_S = 10.0
"""A key found valid is taken as valid for this long without asking the database (`KeyStore.cached`): a key revoked
in the database stops working within this time on every ingress replica."""
AUTH_CACHE_KEYS = 4096
"""Keys remembered per replica (least recently found first out)."""


class KeyStore:
    """Creates and checks API keys held (hashed) in the Repository; remembers the keys it found valid for
    AUTH_CACHE_S, by hash, so that a chat turn's authentication needs no database lookup."""

    def __init__(self, repo: Repository, clock: Callable[[], float] = time.monotonic):
        self.repo, self.clock = repo, clock
        self._valid: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(bearer: str | None) -> str:
        if not bearer:
            raise AuthError("missing API key; send the header 'Authorization: Bearer <key>'")
        key = bearer.strip()
        if key[:7].lower() == "bearer ":
            key = key[7:].strip()
        return hash_key(key)

    def cached(self, bearer: str | None) -> Principal | None:
        """The principal of a key `authenticate` accepted less than AUTH_CACHE_S ago; None: ask `authenticate`."""
        if not bearer:
            return None
        digest, now = self._digest(bearer), self.clock()
        with self._lock:
            hit = self._valid.get(digest)
            if hit is None or hit[1] <= now:
                self._valid.pop(digest, None)  # an expired key is looked up again, and re-remembered if still valid
                return None
            self._valid.move_to_end(digest)
            return hit[0]

    def create_key(self, tenant_id: str, role: Role = "patient-app", label: str = "") -> str:
        """Create a key for `tenant_id` (created if new); the plaintext is returned once and never stored."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is unknown; use one of {list(ROLES)}")
        key = new_key()
        self.repo.ensure_tenant(tenant_id)
        self.repo.put_api_key(tenant_id, hash_key(key), role, label)
        return key

    def register(self, tenant_id: str, key: str, role: Role, label: str = "") -> None:
        """Store (or re-activate) a key chosen elsewhere, e.g. $ATTUNE_API_KEY."""
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"the key is {len(key)} characters; use at least {MIN_KEY_CHARS} random "
                             f"characters, e.g. the output of: python -c \"import secrets; "
                             f"print('{KEY_PREFIX}' + secrets.token_urlsafe(32))\"")
        self.repo.ensure_tenant(tenant_id)
        try:
            self.repo.put_api_key(tenant_id, hash_key(key), role, label)
        except RecordError as e:
            raise ValueError(str(e)) from None

    def ensure_default_tenant(self, data_dir: str | Path, env_key: str | None = None,
                              operator_key: str | None = None) -> tuple[str, Path | None]:
        """Give the local default tenant exactly one patient-app key and one operator key.

        Keys come from `env_key` / `operator_key` (None: $ATTUNE_API_KEY / $ATTUNE_OPERATOR_KEY); a key not
        given is created once and kept in `data_dir` (mode 0600) and reused after. A key that replaces
        another is the only one still valid. Returns (patient-app key, its file, or None if from the env).
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        given = {"patient-app": os.environ.get(ENV_KEY) if env_key is None else env_key,
                 "operator": os.environ.get(ENV_OPERATOR_KEY) if operator_key is None else operator_key}
        result: tuple[str, Path | None] = ("", None)
        for role, filename in (("operator", OPERATOR_KEY_FILE), ("patient-app", KEY_FILE)):
            key, path = given[role], None
            if not key:
                path = data_dir / filename
                key = _read_or_create_secret(path)
            label = f"{DEFAULT_TENANT}:{role}"
            self.register(DEFAULT_TENANT, key, role, label)  # type: ignore[arg-type]
            self.repo.revoke_api_keys(DEFAULT_TENANT, label, keep_hash=hash_key(key))
            result = (key, path)
        return result

    def authenticate(self, bearer: str | None) -> Principal:
        """Accepts an Authorization header value ('Bearer <key>') or the bare key; asks the database."""
        digest = self._digest(bearer)
        found = None
        for row in self._candidates(digest[:LOOKUP_CHARS]):
            if hmac.compare_digest(row.key_hash, digest):
                found = row
        if found is None:
            raise AuthError("invalid API key; check the key (or ask the operator for a new one)")
        principal = Principal(tenant_id=found.tenant_id, role=found.role, key_id=found.id)  # type: ignore[arg-type]
        with self._lock:
            self._valid[digest] = (principal, self.clock() + AUTH_CACHE_S)
            self._valid.move_to_end(digest)
            while len(self._valid) > AUTH_CACHE_KEYS:
                self._valid.popitem(last=False)
        return principal

    def _candidates(self, prefix: str) -> list[ApiKey]:
        """Unrevoked keys whose hash starts with `prefix` (lowercase hex), by an index range scan."""
        with Session(self.repo.engine, expire_on_commit=False) as s, s.begin():
            return list(s.scalars(select(ApiKey).where(ApiKey.key_hash >= prefix, ApiKey.key_hash < prefix + "g",
                                                       ApiKey.revoked.is_(False))))


def _read_or_create_secret(path: Path) -> str:
    if not path.exists():
        key = new_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
        return key
    os.chmod(path, 0o600)
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"key file {path} is empty or damaged; delete it and a new key will be created")
    return key


def evict_buckets(buckets: OrderedDict, max_keys: int, now: float, full_after: float) -> None:
    """Drop the least recently used buckets (key -> (tokens, last used)) beyond `max_keys`, and those idle long
    enough to be full again (forgetting them changes nothing)."""
    while buckets:
        oldest, (_, last) = next(iter(buckets.items()))
        if len(buckets) > max_keys or now - last >= full_after:
            del buckets[oldest]
        else:
            break


class RateLimiter:
    """Per-key token bucket: bursts up to `requests_per_minute`, refilled evenly; 0 disables it.

    Thread-safe. Memory is bounded: buckets idle long enough to be full again are dropped, and past
    `max_keys` the least recently used bucket goes first.
    """

    def __init__(self, requests_per_minute: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if requests_per_minute < 0:
            raise ValueError("requests_per_minute must be >= 0 (0 turns the limit off)")
        self.capacity = float(requests_per_minute)
        self.rate = requests_per_minute / 60.0
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, key: Hashable) -> None:
        """Spend one request for `key` (a stable caller id such as Principal.key_id, not the secret)."""
        if self.capacity <= 0:
            return
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise RateLimited((1.0 - tokens) / self.rate)
            self._buckets[key] = (tokens - 1.0, now)
            self._evict(now)

    async def acquire(self, key: Hashable) -> None:
        """`check` behind the interface of rate_limits.SharedRateLimiter (one replica: nothing to share)."""
        self.check(key)

    def _evict(self, now: float) -> None:
        evict_buckets(self._buckets, self.max_keys, now, self.capacity / self.rate)

    def __len__(self) -> int:
        return len(self._buckets)
