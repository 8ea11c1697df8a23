"""Process-group setup for `deepspeed` / `torchrun`, `srun`, `mpirun` and plain `python` (one process).

Ranks come from the launcher's environment (:func:`world_info_from_env`): ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` (torchrun, the deepspeed launcher), else Slurm's ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` /
``SLURM_LOCALID`` (one ``srun`` task per GPU), else Open MPI's ``OMPI_COMM_WORLD_*``, else MPICH / Intel MPI's
``PMI_RANK`` / ``PMI_SIZE`` / ``MPI_LOCALRANKID``. None of them: a one-process world.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import socket
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("mlmm")
T = TypeVar("T")

# (launcher, rank variable, world-size variables in order of preference, local-rank variable); the first launcher
# whose rank and one world-size variable are set wins. Slurm: the step's task count (srun), never the job's: in the
# batch script itself SLURM_PROCID=0 and SLURM_NTASKS=N are set too, and that single process is not N ranks.
LAUNCHERS = (
    ("torchrun/deepspeed", "RANK", ("WORLD_SIZE",), "LOCAL_RANK"),
    ("srun", "SLURM_PROCID", ("SLURM_STEP_NUM_TASKS",), "SLURM_LOCALID"),
    ("Open MPI", "OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MPICH/Intel MPI", "PMI_RANK", ("PMI_SIZE",), "MPI_LOCALRANKID"),
)


def world_info_from_env(env=None) -> tuple[str, int, int, int]:
    """(launcher, rank, world size, local rank) from the environment; ("none", 0, 1, 0) without a launcher."""
    env = os.environ if env is None else env
    for name, rank_var, size_vars, local_var in LAUNCHERS:
        size_var = next((v for v in size_vars if v in env), None)
        if rank_var in env and size_var is not None:
            return name, int(env[rank_var]), int(env[size_var]), int(env.get(local_var, 0))
    return "none", 0, 1, 0


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``gpu[003-005,9],cpu1`` -> ``gpu003`` (what ``scontrol show hostnames``
    prints first)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read a host from the Slurm node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_world_env(env=None) -> str:
    """Set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` from the launcher's
    variables (torch.distributed reads these); returns the launcher name. Set variables are never overwritten."""
    env = os.environ if env is None else env
    launcher, rank, world, local = world_info_from_env(env)
    if launcher == "none":  # plain `python`: a one-process world on a free local port
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=env.get("MASTER_ADDR", "127.0.0.1"))
        env.setdefault("MASTER_PORT", str(_free_port()))
        if int(env.get("SLURM_NTASKS", 1)) > 1:
            log.warning("SLURM_NTASKS=%s but this process was not started by srun: training on ONE process; start "
                        "one task per GPU with `srun python recipes/train.py ...`", env["SLURM_NTASKS"])
        return launcher
    env.setdefault("RANK", str(rank))
    env.setdefault("WORLD_SIZE", str(world))
    env.setdefault("LOCAL_RANK", str(local))
    if launcher == "srun":
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env and nodes:
            env["MASTER_ADDR"] = first_host(nodes)
        # one port per job, so that two jobs sharing a node do not meet (override with MASTER_PORT)
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "9500")) % 20000))
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing and world > 1:
        raise RuntimeError(f"{launcher} started {world} processes but {' and '.join(missing)} is not set: export "
                           f"MASTER_ADDR=<host of rank 0> MASTER_PORT=<free port> before launching")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return launcher


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Without a launcher (``python recipes/train.py``) this sets up a one-process group on a free
    local port. On CPU the backend is gloo, on CUDA nccl.
    """
    import deepspeed

    if not dist.is_initialized():
        export_world_env()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        elif int(os.environ.get("WORLD_SIZE", 1)) == 1 or os.environ.get("MLMM_CPU_SHM_ALLREDUCE") == "0":
            # DeepSpeed compiles a shared-memory all-reduce kernel for CPU process groups on first
            # use (~1 min of g++). With one process there is nothing to reduce: skip the build;
            # MLMM_CPU_SHM_ALLREDUCE=0 skips it for several processes too (plain gloo all-reduce).
            import importlib

            # (importlib: `import deepspeed.comm.torch as m` would bind the real torch re-exported there)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


_HOST_GROUP: dict = {}


def host_group():
    """A gloo group over every rank for host-side data (sample keys, labels, error messages): collectives on it never
    wait for the GPU. The default group itself when that is gloo. Created on first use (by every rank at once)."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUP:
        _HOST_GROUP.clear()
        _HOST_GROUP[key] = dist.new_group(backend="gloo")
    return _HOST_GROUP[key]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Barrier then destroy the process group (gloo needs the barrier before destroy)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main_decides(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only; every rank returns its result, or raises its exception (collective call).

    For decisions about shared files (the output folder's lock, which checkpoint to resume): one process
    reads them, and a refusal stops all ranks at once instead of leaving some waiting at a collective.
    """
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, on every rank)
            error = e
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sent = error
        if error is not None:
            try:
                pickle.loads(pickle.dumps(error))
            except Exception:  # noqa: BLE001 (an exception type that does not pickle: send its text)
                sent = RuntimeError(f"rank 0: {type(error).__name__}: {error}")
        box = [(result, sent)]
        dist.broadcast_object_list(box, src=0)
        if not is_main():
            result, error = box[0]
    if error is not None:
        raise error
    return result
