"""`attune serve` as `make demo` runs it (no RAY_AUTH_MODE: the private Ray gets a per-run token), in its own process
group with a temporary data dir and free ports, every process it starts carrying a marker variable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attune.paths import REPO_ROOT
from tests.integration.marked import Marker, free_port

READY_S = 900.0
"""Hang guard only (nothing is timed in an assertion): vLLM starting on 2 busy cores."""
SETTINGS = {"engine": {"max_loras": 4, "max_model_len": 1024, "cpu_memory_fraction": 0.02},
            "limits": {"max_tokens_cap": 32, "default_max_tokens": 8}}
"""The built-in defaults with the integration tests' small engine."""


@dataclass
class ServeProcess:
    tmp: Path
    args: list[str] = field(default_factory=list)
    marker: Marker = field(default_factory=lambda: Marker("ATTUNE_TEST_SERVE"))
    port: int = field(default_factory=free_port)
    ui_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    @property
    def data_dir(self) -> Path:
        return self.tmp / "data"

    def start(self) -> "ServeProcess":
        config = self.tmp / "serve.yaml"
        config.write_text(yaml.safe_dump(SETTINGS))
        env = self.marker.env(HF_HUB_OFFLINE="1", ATTUNE_HOME=str(self.tmp / "home"), RAY_USAGE_STATS_ENABLED="0",
                              VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1",
                              PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                       os.environ.get("PYTHONPATH")])))
        for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "ATTUNE_API_KEY",
                    "ATTUNE_OPERATOR_KEY", "ATTUNE_SERVE_CONFIG", "ATTUNE_TEST_HOOKS"):
            env.pop(var, None)
        self.log = self.tmp / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "attune.cli", "serve", "--config", str(config), "--data-dir", str(self.data_dir),
             "--port", str(self.port), "--ui-port", str(self.ui_port), *self.args],
            env=env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group, like a shell job: SIGINT to the group is Ctrl-C
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""

    def wait_for(self, text: str, timeout_s: float = READY_S) -> None:
        """Until `text` is in the output (e.g. the ready line); AssertionError if the process ends first."""
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            assert self.proc.poll() is None, f"attune serve ended with {self.proc.returncode}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {text!r} after {timeout_s:.0f} s:\n{self.output()[-4000:]}"
            time.sleep(1.0)

    def stop(self, sig: signal.Signals, *, group: bool, timeout_s: float = 300.0) -> tuple[int, float, dict]:
        """Send `sig` to the process (or its whole group, as a terminal's Ctrl-C does); return its exit status, the
        seconds until every marked process was gone, and those that survived `timeout_s`."""
        started = time.monotonic()
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        status = self.proc.wait(timeout=timeout_s)
        left = self.marker.wait_gone(max(5.0, timeout_s - (time.monotonic() - started)))
        return status, time.monotonic() - started, left

    def kill(self) -> dict:
        """Clean-up after a failure: SIGKILL whatever is left; returns what was."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.marker.kill_all()
