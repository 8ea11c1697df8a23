"""How well a noisy-correspondence loss separates clean from mismatched pairs.

    report = noisy_split_report(trainer.loss, "data/noisy/shards")   # {"auroc": 0.97, "n": 400, ...}

Ground truth is the ``"noisy"`` flag that :mod:`mlmm.synthetic.noisy` writes into the sample json (used
for evaluation only). The score of a sample is ``1 - w`` with ``w`` its clean posterior from the last
BMM fit; AUROC = P(score of a random noisy sample > score of a random clean one), ties counting 1/2
(the Mann-Whitney U statistic, equal to ``sklearn.metrics.roc_auc_score``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` [N] for binary ``labels`` [N] (True = positive class)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for v in scores.unique():  # average ranks over ties
        tie = scores == v
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def find_rcar(loss: nn.Module) -> Optional[nn.Module]:
    """The RCAR loss inside ``loss`` (itself or a term of a ``multi`` loss), or None."""
    from mlmm.losses.noisy import RCARLoss

    return next((m for m in loss.modules() if isinstance(m, RCARLoss)), None)


def noisy_split_report(loss: nn.Module, shards: str) -> dict[str, Any]:
    """AUROC of the clean/noisy split over the training samples that had a posterior at the last fit."""
    from mlmm.data.shards import iter_samples, resolve_shards

    rcar = find_rcar(loss)
    if rcar is None:
        raise ValueError("noisy_split_report: the loss has no rcar term")
    if not rcar.fits:
        raise ValueError("noisy_split_report: the BMM has not been fitted yet (train past loss.warmup_steps)")
    flags = {s["__key__"]: bool(s["json"].get("noisy", False)) for s in iter_samples(resolve_shards(shards))}
    w = rcar.memory.posterior(list(flags))  # NaN: not in the memory at the last fit
    known = ~torch.isnan(w)
    w, noisy = w[known], torch.tensor(list(flags.values()))[known]
    pred_noisy = w < 0.5
    tp = int((pred_noisy & noisy).sum())
    return {"auroc": auroc(1 - w, noisy), "n": len(w), "n_noisy": int(noisy.sum()),
            "precision@0.5": tp / max(int(pred_noisy.sum()), 1), "recall@0.5": tp / max(int(noisy.sum()), 1),
            "mean_w_clean": float(w[~noisy].mean()), "mean_w_noisy": float(w[noisy].mean()), "fits": rcar.fits}
