"""Evaluation across ranks: launched by ``torchrun`` / ``deepspeed`` every rank encodes its share of the test set
and the embeddings are gathered, so every rank ends with what one process would have computed.

    rank, world = init_eval_distributed()      # from the launcher's env (RANK, WORLD_SIZE, ...); (0, 1) without one
    parts = gather_objects(my_part)            # [part of rank 0, part of rank 1, ...] on every rank
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from mlmm.training.distributed import device, is_main  # noqa: F401 (re-exported for the entry points)

_OWNED = False  # True when init_eval_distributed created the process group (then cleanup() destroys it)


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_eval_distributed() -> tuple[int, int]:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1; -> (rank, world)."""
    global _OWNED
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        _OWNED = True
    return world()


def cleanup() -> None:
    """Barrier + destroy the process group if :func:`init_eval_distributed` created it (a caller's group is kept)."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        from mlmm.training.distributed import cleanup as destroy

        destroy()
    _OWNED = False


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order, on every rank."""
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def split_encode(encode, items: Sequence[Any], chunk: int = 256, order: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``encode(list) -> [n, E]`` over ``items`` in fixed chunks of ``chunk``, the chunks dealt round-robin to the
    ranks (rank r encodes chunks r, r + world, ...) and gathered back in order. One process encodes the same chunks,
    so every item is embedded in the same batch either way (bitwise-equal embeddings on the same kernels).

    ``order`` (a permutation of the items, e.g. :meth:`EvalModel.text_order`: texts by length): the chunks are cut
    from the items in that order, and the rows come back in the order of ``items``."""
    rank, size = world()
    items = list(items)
    if order is not None:
        items = [items[i] for i in order]
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    if size == 1 or len(chunks) == 0:
        out = torch.cat([encode(c) for c in chunks]) if chunks else encode([])
    else:
        mine = {i: encode(c) for i, c in enumerate(chunks) if i % size == rank}
        parts = gather_objects(mine)
        out = torch.cat([parts[i % size][i] for i in range(len(chunks))])
    return out if order is None or not chunks else out[torch.tensor(list(order)).argsort()]
