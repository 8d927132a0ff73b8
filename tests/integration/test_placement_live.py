"""On this CPU machine the started service keeps its own processes off vLLM's worker cores (serving.cpu_placement),
and the caller's own affinity is left as it was."""
from __future__ import annotations

import os

import psutil
import pytest

from serving import cpu_placement


def _affinities(proc: psutil.Process) -> set[frozenset[int]]:
    out = set()
    for t in proc.threads():
        try:
            out.add(frozenset(os.sched_getaffinity(t.id)))
        except OSError:  # a thread that ended meanwhile
            pass
    return out


def test_vllm_worker_and_the_services_run_on_separate_cores(server):
    split = cpu_placement.plan()
    if split is None:
        pytest.skip("no CPU split on this machine (vLLM not on CPU, not x86, or fewer than two cores)")
    engine, service = frozenset(split.engine), frozenset(split.service)
    seen: dict[str, set[frozenset[int]]] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            for role in ("VLLM::Worker", "AttuneIngress", "RewardScorer", "LLMServer", "ProxyActor", "raylet"):
                if role in title:
                    seen.setdefault(role, set()).update(_affinities(p))
        except psutil.Error:
            continue
    assert set(seen) >= {"VLLM::Worker", "AttuneIngress", "RewardScorer", "LLMServer", "ProxyActor", "raylet"}, seen
    assert seen["VLLM::Worker"] == {engine}, seen["VLLM::Worker"]
    for role in ("AttuneIngress", "RewardScorer", "LLMServer", "ProxyActor", "raylet"):
        assert all(a <= service for a in seen[role]), (role, seen[role])
    assert os.sched_getaffinity(0) >= engine | service  # the test process (the driver) was given its cores back
