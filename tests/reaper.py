"""Clean-up that outlives a killed test run: a detached shell that waits for this process to end, then runs a
command (stop a private database server, kill a test cluster by pid). `cancel()` it after a normal clean-up."""
from __future__ import annotations

import os
import subprocess


class Reaper:
    def __init__(self, command: str, poll_s: float = 2.0):
        script = f"while [ -d /proc/{os.getpid()} ]; do sleep {poll_s}; done; {command}"
        self._proc = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cancel(self) -> None:
        self._proc.kill()
        self._proc.wait()
