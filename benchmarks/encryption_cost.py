"""What encryption at rest costs: AES-GCM seal + open of one message and the unwrap of a session key (serving/crypto),
and Repository.add_message / list_messages on a SQLite file. Runs from any checkout (before encryption too, where it
times the Repository alone), so the two can be compared on one machine:
    PYTHONPATH=. python benchmarks/encryption_cost.py
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

TEXT = ("I have not slept properly for weeks, and every morning I dread going into work because my manager keeps "
        "criticising me in front of everyone. I do not know who to talk to about it any more.")  # ~200 characters


def per_call_us(fn, n: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):  # best of three runs: the least disturbed by other processes
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def main() -> None:
    try:
        from serving.crypto import KeyRing, new_key_text
    except ImportError:
        print("serving.crypto absent: this checkout stores plaintext")
    else:
        ring = KeyRing.from_text(new_key_text(), "bench")
        kid, wrapped, cipher = ring.new_session_key("s")
        sealed = cipher.seal("message", "m", TEXT)
        print(f"seal + open of a {len(TEXT)}-character message: "
              f"{per_call_us(lambda: cipher.open('message', 'm', cipher.seal('message', 'm', TEXT)), 20000):.1f} us")
        print(f"unwrap a session key: {per_call_us(lambda: ring.unwrap('s', kid, wrapped), 20000):.1f} us; "
              f"stored overhead per message: {len(sealed) - len(TEXT.encode())} bytes")

    from serving.db import Repository

    with tempfile.TemporaryDirectory() as d:
        repo = Repository(f"sqlite:///{Path(d) / 'attune.db'}")
        repo.ensure_tenant("t")
        sid = repo.create_session("t", {"safety": 1.0}).id
        for _ in range(40):
            repo.add_message(sid, "user", TEXT)
        print(f"Repository.add_message: {per_call_us(lambda: repo.add_message(sid, 'user', TEXT), 200) / 1000:.2f} ms")
        print(f"Repository.list_messages(limit=20): "
              f"{per_call_us(lambda: repo.list_messages(sid, limit=20), 300) / 1000:.2f} ms")
        repo.close()


if __name__ == "__main__":
    main()
