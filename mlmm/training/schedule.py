"""Learning-rate schedule: linear warmup then cosine decay to ``min_lr_ratio * lr``."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio),
    )


def follow_config(scheduler: torch.optim.lr_scheduler.LambdaLR, train_cfg) -> None:
    """After a resume, make the restored optimizer and scheduler follow `train_cfg` (a TrainConfig).

    A checkpoint restores the scheduler's base lrs and the optimizer's lr, betas, eps and weight decay as they were
    saved; the schedule's shape (warmup, max_steps, floor) is the new one already (the lambda is not saved). Here the
    peak lr and the AdamW hyperparameters are set from the config and the current lr is recomputed, so an edited
    value applies from the next step on. Parameter group 0 is the decayed one
    (:func:`mlmm.training.engine.param_groups`).
    """
    optimizer, t = scheduler.optimizer, train_cfg
    scheduler.base_lrs = [t.lr for _ in optimizer.param_groups]
    for i, (group, lam) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = t.lr
        group["lr"] = t.lr * lam(scheduler.last_epoch)
        group["betas"], group["eps"] = tuple(t.betas), t.eps
        if i == 0:
            group["weight_decay"] = t.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
