"""serving.cpu_placement: which cores vLLM's CPU worker gets and which the rest of `attune serve` gets."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from serving import cpu_placement
from serving.cpu_placement import CpuSplit, split_cpus


@dataclass
class Cpu:
    id: int
    physical_core: int
    numa_node: int = 0


def test_two_cores_give_the_worker_the_first_and_the_service_the_last():
    assert split_cpus([Cpu(0, 0), Cpu(1, 1)], node=0) == CpuSplit(engine=(0,), service=(1,))


def test_hyperthreads_give_the_worker_one_logical_cpu_per_core_as_vllm_does():
    # 4 cores x 2 threads, siblings i and i + 4 (the usual Linux numbering): vLLM picks the higher sibling per core
    cpus = [Cpu(i, i % 4) for i in range(8)]
    split = split_cpus(cpus, node=0)
    assert split.engine == (4, 5, 6)
    assert split.service == (0, 1, 2, 3, 7)
    assert split.bind == "4,5,6"


def test_only_the_chosen_numa_node_feeds_the_worker():
    cpus = [Cpu(i, i, numa_node=i // 4) for i in range(8)]
    split = split_cpus(cpus, node=0)
    assert split.engine == (0, 1, 2)
    assert split.service == (3, 4, 5, 6, 7)


@pytest.mark.parametrize("cpus", [[Cpu(0, 0)], [Cpu(0, 0), Cpu(1, 0)], []])
def test_fewer_than_two_cores_leave_placement_to_the_os(cpus):
    assert split_cpus(cpus, node=0) is None


def test_plan_is_off_when_disabled_or_when_the_operator_bound_vllm():
    assert cpu_placement.plan(enabled=False, environ={}) is None
    assert cpu_placement.plan(enabled=True, environ={cpu_placement.BIND_ENV: "0-3"}) is None


def test_affinity_holds_within_the_block_and_is_restored():
    before = os.sched_getaffinity(0)
    one = min(before)
    with cpu_placement.affinity((one,)):
        assert os.sched_getaffinity(0) == {one}
    assert os.sched_getaffinity(0) == before
    with cpu_placement.affinity(None):
        assert os.sched_getaffinity(0) == before


def test_the_setting_is_on_by_default_and_can_be_turned_off():
    from serving.config import ServeConfig

    assert ServeConfig().engine.cpu_placement is True
    assert ServeConfig.model_validate({"engine": {"cpu_placement": False}}).engine.cpu_placement is False
