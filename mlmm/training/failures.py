"""One rank fails, every rank stops: within seconds, each printing the error, never waiting in a collective.

A check that looks at one rank's own data (the loader, the language check, the bad-data limit, the device copy)
can fail on that rank alone. The rank does not stop at once, since the others would then wait for it in the
step's collectives until the 30-minute timeout. It finishes the step on a batch without rows, with its loss
multiplied by NaN: the gradient all-reduce spreads the NaN, and DeepSpeed's non-finite check (an all-reduce every
update already does) skips the update on every rank. On that rare skipped update, and only there, the ranks
exchange what went wrong (:func:`raise_if_any_rank_failed`) and all raise together.

An error inside the engine calls (out of memory in forward or backward) cannot be folded in: the other ranks are
already inside collectives this rank will not join. That rank raises at once, and the entry point exits without
entering any barrier (``recipes/train.py``). Then the process group ends: gloo peers see the closed connection and
raise, and torchrun, the deepspeed launcher and ``srun --kill-on-bad-exit=1`` stop the remaining NCCL ranks.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist


class RankFailure(RuntimeError):
    """Another rank failed; this one stops with it."""


def describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def raise_if_any_rank_failed(failure: Optional[BaseException], step: int) -> None:
    """Collective: every rank's error (or None) over the host group; raise on every rank if any rank failed.

    The failing rank re-raises its own exception; the others raise :class:`RankFailure` naming it."""
    errors: list[Optional[str]] = [describe(failure) if failure is not None else None]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from mlmm.training.distributed import host_group

        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, describe(failure) if failure is not None else None, group=host_group())
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if failure is not None:
        raise failure
    me = dist.get_rank()
    listed = "; ".join(f"rank {r}: {e}" for r, e in failed)
    raise RankFailure(f"step {step}: {listed} -- every rank stops (this is rank {me}, which was fine)")
