"""Process start-up and shutdown: torchrun (env://), Slurm ``srun`` without torchrun, or one process.

Which processes exist is read from the environment before anything is started, so the layout
can be checked first. Only ``start_process_group`` talks to ``torch.distributed``'s default group;
every sub-group comes from :mod:`parallel.runtime`'s device mesh.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bindweave.errors import BindWeaveInputError

# Slurm gives no rendezvous port; every task of a job derives the same one from the job id, so two
# jobs sharing a node do not collide (override with MASTER_PORT).
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of the launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes of the launch on this machine (they share its host memory)
    launcher: str = "single"  # "torchrun", "srun" or "single"
    master_addr: str | None = None
    master_port: int | None = None


def detect_processes(env: Mapping[str, str] = os.environ) -> Processes:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK first, then an srun task's SLURM_PROCID/SLURM_LOCALID.

    An srun task's world is its step's SLURM_STEP_NUM_TASKS: the batch script itself also has
    SLURM_PROCID=0 and, with --ntasks, SLURM_NTASKS, but it is one process, not rank 0 of many.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return Processes(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                         local_rank=_int(env, "LOCAL_RANK", 0), local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1),
                         launcher="torchrun",
                         master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"))
    if "SLURM_PROCID" in env and _int(env, "SLURM_STEP_NUM_TASKS", 1) > 1:
        return Processes(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
                         local_rank=_int(env, "SLURM_LOCALID", 0), local_world_size=_tasks_on_this_node(env),
                         launcher="srun",
                         master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env),
                         master_port=_int(env, "MASTER_PORT") or _slurm_port(env))
    return Processes()


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """An srun step's tasks on this node: SLURM_STEP_TASKS_PER_NODE is "4" or "4(x2)" or "3,2" (one
    count per node, in SLURM_NODEID order, "(xN)" repeating one)."""
    text, counts = env.get("SLURM_STEP_TASKS_PER_NODE", "1"), []
    try:
        for part in text.split(","):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    except ValueError:
        raise BindWeaveInputError(f"environment variable SLURM_STEP_TASKS_PER_NODE={text!r} is not Slurm's "
                                  "'N', 'N(xM)' or 'N,M,...'") from None
    return counts[min(_int(env, "SLURM_NODEID", 0), len(counts) - 1)]


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    """The variable as an int; ``default`` when it is not set (callers check presence first)."""
    if name not in env:
        return default
    try:
        return int(env[name])
    except ValueError:
        raise BindWeaveInputError(f"environment variable {name}={env[name]!r} is not a whole number") from None


def _first_slurm_host(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise BindWeaveInputError("running under srun but SLURM_JOB_NODELIST is not set: export MASTER_ADDR "
                                  "(the first node's host name) in the batch script")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        raise BindWeaveInputError(f"could not expand SLURM_JOB_NODELIST={nodelist} with scontrol ({error}): "
                                  "export MASTER_ADDR in the batch script") from None
    return hosts[0]


def _slurm_port(env: Mapping[str, str]) -> int:
    return SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % SLURM_PORT_SPAN


def rank_device(processes: Processes, device_type: str) -> torch.device:
    """One process per GPU: rank r computes on GPU LOCAL_RANK; on CPU every rank uses the CPU."""
    return torch.device("cuda", processes.local_rank) if device_type == "cuda" else torch.device("cpu")


def start_process_group(processes: Processes, device_type: str, timeout_s: float) -> None:
    """Join the default process group: NCCL on CUDA, gloo on CPU. One process starts none.

    ``timeout_s`` bounds every collective, so a rank whose peer died fails (and the launcher ends
    the job) instead of hanging.
    """
    if processes.world_size == 1:
        return
    if device_type == "cuda":
        # Before the group exists, so NCCL binds this rank's communicators to its own GPU.
        torch.cuda.set_device(rank_device(processes, device_type))
    if processes.launcher == "srun":
        # deepspeed and xfuser read torchrun's variables too; give them the same layout.
        os.environ.update(RANK=str(processes.rank), WORLD_SIZE=str(processes.world_size),
                          LOCAL_RANK=str(processes.local_rank), MASTER_ADDR=processes.master_addr,
                          MASTER_PORT=str(processes.master_port))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method="env://",
                            rank=processes.rank, world_size=processes.world_size,
                            timeout=timedelta(seconds=timeout_s))


def smallest_across_ranks(value: float | None) -> float | None:
    """The smallest of every rank's ``value`` (None where every rank has None); a collective of the
    default group, every rank calls it. One process: ``value``."""
    if not dist.is_initialized():
        return value
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    known = [each for each in values if each is not None]
    return min(known) if known else None


# Ranks of a data-parallel job finish their own samples hours apart.
FINISH_TIMEOUT = timedelta(days=2)


def finish_barrier_group() -> dist.ProcessGroup | None:
    """A CPU group whose barrier waits as long as a job can take (the default group's timeout is
    short, so that a dead peer fails fast). None for one process. A collective: every rank calls it."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=FINISH_TIMEOUT)


def stop_process_group() -> None:
    """Leave the process group cleanly (no-op for one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
