"""Processes a test started, found by a marker variable in their environment (every child of a process inherits it),
so a test can assert that none survives and kill only its own, never others' Ray or vLLM processes on the host."""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

from tests.reaper import Reaper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Marker:
    """`env()` gives a child environment carrying NAME=<unique value>; `pids()` lists the live processes that carry it,
    whatever their process group or parent; a Reaper kills them if the test process dies first."""

    def __init__(self, name: str):
        self.name, self.value = name, uuid.uuid4().hex
        self._reaper = Reaper(f"for p in /proc/[0-9]*; do grep -qzx {name}={self.value} $p/environ 2>/dev/null && "
                              "kill -9 ${p#/proc/}; done")

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        return {**(os.environ if base is None else base), **extra, self.name: self.value}

    def pids(self) -> dict[int, str]:
        """pid -> command line of every live (not zombie) process carrying the marker."""
        mark, found = f"{self.name}={self.value}".encode(), {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and mark in env.split(b"\0"):
                found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()[:160]
        return found

    def wait_gone(self, timeout_s: float) -> dict[int, str]:
        """Poll until no marked process is left or `timeout_s` passed; returns those left."""
        deadline = time.monotonic() + timeout_s
        while (left := self.pids()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def kill_all(self) -> dict[int, str]:
        """SIGKILL every marked process (clean-up after a failed test); returns those that were still alive."""
        left = self.pids()
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait_gone(10)
        self._reaper.cancel()
        return left
