"""A Ray cluster started the way our configs start one (RAY_AUTH_MODE=token, the token from a file only the operator
can read, the dashboard on an address only the cluster's side can reach) refuses a job submitted without the token
or with a wrong one, and runs the one submitted with it. `ray start` and `ray job submit` are the real CLI; the head
runs in its own temp dir on free ports and is torn down by killing the pids that carry its marker (never `ray stop`,
which stops every Ray process on the host)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from attune.paths import REPO_ROOT
from tests.integration.marked import Marker, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
JOB_SAYS = "attune-auth-job-ran"


@pytest.fixture(scope="module")
def head():
    """A one-node cluster: `ray start --head` with token auth and the dashboard (the job server) on 127.0.0.1."""
    marker = Marker("ATTUNE_TEST_RAY_AUTH")
    temp = Path(tempfile.mkdtemp(prefix="ata-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token_file = temp / "ray_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    home = temp / "home"  # neither read nor write the host user's ~/.ray/auth_token
    home.mkdir()
    env = marker.env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), HOME=str(home),
                     RAY_USAGE_STATS_ENABLED="0",
                     PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(var, None)
    picked: set[int] = set()
    while len(picked) < 9:  # free_port can hand out a port twice (it is free again once probed); Ray refuses that
        picked.add(free_port())
    drawn = iter(sorted(picked))
    dashboard = f"http://127.0.0.1:{next(drawn)}"
    gcs = f"127.0.0.1:{next(drawn)}"
    ports = [f"--{flag}={next(drawn)}" for flag in ("node-manager-port", "object-manager-port",
                                                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port",
                                                     "ray-client-server-port")]
    try:
        done = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=1",
             f"--object-store-memory={100 * 2**20}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", "--disable-usage-stats", f"--port={gcs.rsplit(':', 1)[1]}", *ports],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"ray start failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        yield {"gcs": gcs, "dashboard": dashboard, "env": env, "token_file": token_file, "home": home, "marker": marker}
    finally:
        left = marker.kill_all()
        subprocess.run(["rm", "-rf", str(temp)], check=False)
        print(f"\nstopped the test head ({len(left)} processes)")


def submit(head: dict, submission_id: str, **auth: str) -> subprocess.CompletedProcess:
    """`ray job submit` from a client whose environment holds only `auth` (RAY_AUTH_*), as an operator's shell."""
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")} | auth
    return subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={head['dashboard']}",
                           f"--submission-id={submission_id}", "--", "python", "-c", f"print({JOB_SAYS!r})"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=head["home"])


def job_ids(head: dict) -> set[str]:
    from ray.job_submission import JobSubmissionClient

    token = head["token_file"].read_text()
    client = JobSubmissionClient(head["dashboard"], headers={"Authorization": f"Bearer {token}"})
    return {j.submission_id for j in client.list_jobs()}


@pytest.mark.parametrize("auth", [
    {"RAY_AUTH_MODE": "disabled"},
    {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
], ids=["no-token", "wrong-token"])
def test_job_without_the_token_is_refused(head, auth):
    sid = f"refused-{auth['RAY_AUTH_MODE']}"
    done = submit(head, sid, **auth)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-3000:]
    # the dashboard's answer: 401 "Unauthorized: Missing ..." or 403 "Forbidden: Invalid authentication token"
    expected = "Forbidden: Invalid authentication token" if "RAY_AUTH_TOKEN" in auth else "Unauthorized: Missing"
    assert "AuthenticationError" in out and expected in out, out[-3000:]
    assert JOB_SAYS not in out
    assert sid not in job_ids(head), "a refused submission must leave no job behind"


def test_job_with_the_token_runs(head):
    done = submit(head, "with-token", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(head["token_file"]))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert JOB_SAYS in out and "succeeded" in out.lower(), out[-3000:]
    assert "with-token" in job_ids(head)


def test_a_driver_without_the_token_cannot_join(head):
    """The GCS (what `ray.init(address=...)`, `serve deploy` and joining nodes talk to) refuses too, not only the
    dashboard's HTTP API."""
    code = ("import ray, sys\n"
            "try:\n    ray.init(address=sys.argv[1], logging_level='ERROR')\nexcept Exception as e:\n"
            "    print('REFUSED', type(e).__name__, str(e)[:300]); sys.exit(3)\nprint('JOINED')")
    env = {k: v for k, v in head["env"].items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", code, head["gcs"]], env=env, capture_output=True, text=True,
                          timeout=120, cwd=head["home"])
    out = done.stdout + done.stderr
    assert "JOINED" not in done.stdout and done.returncode != 0, out[-3000:]
    assert "authentication" in out.lower(), out[-3000:]
