"""API keys made straight in the live service's database, the way `attune serve` makes the local tenant's keys, so
a test can spread many requests over many rate-limit buckets without raising the product's limit for anyone."""
from __future__ import annotations

import itertools
from typing import Iterator

from tests.integration.api import auth


class KeyPool:
    """`size` fresh keys of one tenant and role; `next()` hands them out in turn, `headers()` as a bearer header."""

    def __init__(self, server, tenant: str, role: str = "patient-app", size: int = 1):
        from serving.auth import KeyStore
        from serving.db import Repository

        repo = Repository(f"sqlite:///{server.data_dir / 'attune.db'}", create_tables=False)
        try:
            keys = KeyStore(repo)
            self.keys = [keys.create_key(tenant, role, f"test-pool:{i}") for i in range(size)]  # type: ignore[arg-type]
        finally:
            repo.close()
        self.tenant = tenant
        self._turn: Iterator[str] = itertools.cycle(self.keys)

    def next(self) -> str:
        return next(self._turn)

    def headers(self) -> dict[str, str]:
        return auth(self.next())
