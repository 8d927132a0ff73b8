"""`make demo` (`attune serve --ui`) stopped by Ctrl-C (SIGINT to its process group, as a terminal sends it) or by
SIGTERM to the process (`kill`, `docker stop`) exits with status 0 and leaves no process behind: not Serve's
replicas, vLLM's engine, Ray's agents (DashboardAgent, RuntimeEnvAgent), the raylet or GCS, nor the patient UI.
The time to stop is printed, not asserted."""
from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]


@pytest.mark.parametrize("sig,group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
def test_serve_stops_cleanly(tmp_path, sig, group):
    pytest.importorskip("vllm")
    served = ServeProcess(tmp_path, ["--ui"]).start()
    try:
        served.wait_for("Patient UI at http://")
        assert httpx.get(f"http://127.0.0.1:{served.port}/healthz", timeout=30).status_code == 200
        running = served.marker.pids()
        assert any("raylet" in c for c in running.values()) and any("attune.cli ui" in c for c in running.values()), running
        status, seconds, left = served.stop(sig, group=group)
        print(f"\n{sig.name} ({'process group' if group else 'process'}): exit status {status}, every process gone "
              f"after {seconds:.1f} s ({len(running)} were running)")
        assert status == 0, served.output()[-4000:]
        assert not left, f"survived {sig.name}: {left}"
        out = served.output()
        assert "Aborted" not in out and "Traceback" not in out, out[-4000:]
    finally:
        served.kill()
