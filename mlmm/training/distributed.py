"""Process-group setup for `deepspeed` launches, `torchrun` and plain `python` (one process)."""
from __future__ import annotations

import os
import pickle
import socket
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        if "RANK" not in os.environ:  # plain `python`: a one-process world
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
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
