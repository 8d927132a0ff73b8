"""`attune status` as an operator runs it, in its own process, against the real application: after a chat request it
shows every deployment's running replica, the adapter that request used in the LLM replica's LoRA cache and the
gate's decisions, finding the operator key where the service wrote it; a wrong key exits non-zero."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import httpx
import pytest

from attune.paths import REPO_ROOT


def attune(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("ATTUNE_OPERATOR_KEY", "ATTUNE_URL")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "attune.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**environ, **env})


@pytest.mark.integration
def test_status_shows_replicas_adapters_and_gate_decisions(server):
    operator = {"Authorization": f"Bearer {server.operator_key}"}
    key = httpx.post(f"{server.v1}/admin/keys", json={"tenant": f"t-{uuid.uuid4().hex[:8]}"}, headers=operator,
                     timeout=60).json()["key"]
    adapter_id = sorted(server.adapters)[0]
    r = httpx.post(f"{server.v1}/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                   json={"model": "attune", "messages": [{"role": "user", "content": "Work has been overwhelming lately."}],
                         "max_tokens": 8, "temperature": 0, "preference": server.adapters[adapter_id]})
    assert r.status_code == 200, r.text
    used = r.json()["attune"]["adapter"]

    done = attune("status", ATTUNE_URL=server.url, ATTUNE_DATA_DIR=str(server.data_dir))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    print("\n" + out)
    for deployment in ("AttuneIngress", "LLMServer", "RewardScorer"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(deployment))
        assert line.split()[1] == "HEALTHY" and line.endswith("replicas: 1 running"), line
    live = [ln for ln in out.splitlines() if "(now):" in ln]
    assert len(live) == 1 and used in {a.strip() for a in live[0].split("(now):")[1].split(",")}, out
    passed = int(re.search(r"gate decisions: pass=(\d+)", out).group(1))
    assert passed >= 1 and "safety threshold" in out

    wrong = attune("status", "--url", server.url, "--operator-key", "att-" + "x" * 40)
    assert wrong.returncode == 1 and "refused the key (HTTP 401" in wrong.stderr and wrong.stdout == ""
