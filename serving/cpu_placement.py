"""Where `attune serve`'s own processes run beside vLLM's CPU worker on one machine.

vLLM's CPU backend binds its worker (the model's compute: one OpenMP thread per physical core) to the cores of one
NUMA node but the last, which it leaves to its scheduler process. Every other process is left to the OS, which also
places Attune's (the ingress, the scorer with the crisis detector, Serve's proxy and controller, Ray's daemons) on the
worker's cores: each time slice one of them takes there stalls the model's OpenMP thread, so decoding and the first
token slow down by more than the CPU they use. So `start_local` names the worker's cores for vLLM
(VLLM_CPU_OMP_THREADS_BIND: the cores vLLM's automatic binding picks, computed with vLLM's own topology helpers) and
starts Ray with every other core allowed, which every Ray process inherits, vLLM's scheduler process included; the
worker binds itself to its cores. Only for a private instance on a CPU machine whose operator has not bound vLLM
themselves (VLLM_CPU_OMP_THREADS_BIND unset); `engine.cpu_placement: false` turns it off.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


class LogicalCpu(Protocol):
    """vllm.utils.cpu_resource_utils.LogicalCPUInfo's fields."""

    id: int
    physical_core: int
    numa_node: int


@dataclass(frozen=True)
class CpuSplit:
    engine: tuple[int, ...]
    """Logical CPUs of vLLM's worker (one OpenMP thread each)."""
    service: tuple[int, ...]
    """Every other allowed logical CPU: Ray's and Attune's processes and vLLM's scheduler process."""

    @property
    def bind(self) -> str:
        """The engine CPUs as VLLM_CPU_OMP_THREADS_BIND spells them."""
        return ",".join(map(str, self.engine))


def split_cpus(cpus: Sequence[LogicalCpu], node: int) -> CpuSplit | None:
    """vLLM's automatic binding on x86 for one worker: on NUMA node `node`, one logical CPU per physical core (the
    highest-numbered of its hyperthreads), all but the last of them for the worker. None when that leaves the worker
    no core, or nothing for the rest."""
    per_core: dict[int, int] = {}
    for cpu in cpus:
        if cpu.numa_node == node:
            per_core[cpu.physical_core] = max(per_core.get(cpu.physical_core, -1), cpu.id)
    chosen = sorted(per_core.values())
    if len(chosen) < 2:
        return None
    engine = tuple(chosen[:-1])
    service = tuple(sorted({cpu.id for cpu in cpus} - set(engine)))
    return CpuSplit(engine, service) if service else None


def plan(enabled: bool = True, environ: dict[str, str] | None = None) -> CpuSplit | None:
    """The split for a private instance on this machine, or None: turned off, not Linux, vLLM bound by the operator
    (VLLM_CPU_OMP_THREADS_BIND set), not a vLLM CPU platform, not x86 (vLLM picks cores differently there), or too
    few cores."""
    env = os.environ if environ is None else environ
    if not enabled or sys.platform != "linux" or env.get(BIND_ENV):
        return None
    try:
        from vllm.platforms import CpuArchEnum, current_platform
        import vllm.utils.cpu_resource_utils as cr_utils
    except ImportError:
        return None
    if not current_platform.is_cpu() or current_platform.get_cpu_architecture() != CpuArchEnum.X86:
        return None
    nodes = cr_utils.get_visible_memory_node()
    return split_cpus(cr_utils.get_allowed_cpu_list(), nodes[0]) if nodes else None


@contextlib.contextmanager
def affinity(cpus: Sequence[int] | None) -> Iterator[None]:
    """Within the block the calling thread (and every process it starts) may run only on `cpus` (None: unchanged);
    its affinity is restored after."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
