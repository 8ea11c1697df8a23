"""VSE losses: VSE++ hardest-negative triplet (``vse_triplet``) and the full VSE objective (``vse``).

    loss: {name: vse_triplet, pairs: [[image, text]], margin: 0.2, max_violation: true}     # instead of InfoNCE
    loss: {name: vse, media: image, objective: triplet, margin: 0.2, align_weight: 1.0, fusion_weight: 1.0}

**Triplet (Faghri et al., "VSE++", BMVC 2018).** With ``s(i, j)`` the score of media i and text j and the positives
on the diagonal, for every positive pair::

    cost_m(i) = [m + s(i, j) - s(i, i)]_+   over texts j != i      (media i as the query)
    cost_t(i) = [m + s(j, i) - s(i, i)]_+   over media j != i      (text i as the query)

``max_violation: true`` keeps the hardest negative of each query (VSE++, MH), ``false`` sums over all negatives
(VSE0, SH). The loss is ``cost_m + cost_t`` summed (``reduction: sum``, as VSE++) or averaged over the queries.
Pairs marked as non-negatives (rows of one sample in several languages, identical captions) never count.
``vse_triplet`` scores the pooled embeddings and gathers them across ranks (each rank scores its own rows against
the global batch, like the contrastive loss).

**VSE** (with the ``vse`` head): ``global_weight * L(global cosine) + align_weight * L(alignment scores)
+ fusion_weight * 0.5 * (CE(t2m, 0) + CE(m2t, 0))``, where ``L`` is the triplet loss or InfoNCE (``objective``) and
the last term trains the fusion encoder on the head's hard negatives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.losses.contrastive import (at_least_fp32, check_pair, covered_pairs, gather_with_grad, local_vs_global,
                                    pair_name, paired_modalities, rank_and_world, temperature)
from mlmm.losses.divtr import interaction_ce
from mlmm.registry import LOSSES


def triplet_loss(scores: torch.Tensor, margin: float, max_violation: bool = True,
                 exclude: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """VSE++ loss of a square score matrix [n, n] (media rows, text columns, positives on the diagonal)."""
    n = scores.shape[0]
    scores = at_least_fp32(scores)
    d = scores.diagonal()
    banned = torch.eye(n, dtype=torch.bool, device=scores.device)
    if exclude is not None:
        banned = banned | exclude
    cost_m = (margin + scores - d[:, None]).clamp(min=0).masked_fill(banned, 0.0)  # [n, n] media i vs text j
    cost_t = (margin + scores - d[None, :]).clamp(min=0).masked_fill(banned, 0.0)  # [n, n] text j vs media i
    if max_violation:
        per_query = cost_m.max(dim=1).values + cost_t.max(dim=0).values  # [n]
    else:
        per_query = cost_m.sum(dim=1) + cost_t.sum(dim=0)
    return per_query.sum() if reduction == "sum" else per_query.mean()


def triplet_local(a_local: torch.Tensor, b_local: torch.Tensor, valid_local: torch.Tensor, margin: float,
                  max_violation: bool, groups_local: Optional[torch.Tensor] = None,
                  reduction: str = "mean") -> torch.Tensor:
    """:func:`triplet_loss` of the global batch (gathered with gradient), for this rank's valid rows.

    Returns this rank's share (:func:`~mlmm.losses.contrastive.local_vs_global`): the mean over ranks is the mean
    (``reduction: sum``: the sum) over the global batch's valid queries, as one process would compute it.
    """
    a_all, b_all = at_least_fp32(gather_with_grad(a_local)), at_least_fp32(gather_with_grad(b_local))  # [W*B, D]
    labels, allowed, weight, norm = local_vs_global(valid_local, groups_local, a_all.dtype)
    s_m = a_all[labels] @ b_all.t()  # [B, W*B]: my media vs every text
    s_t = b_all[labels] @ a_all.t()  # [B, W*B]: my texts vs every media
    pos = s_m.gather(1, labels[:, None])  # [B, 1]
    banned = ~allowed  # invalid rows, same group ...
    banned[torch.arange(labels.numel(), device=labels.device), labels] = True  # ... and the positive itself
    cost_m = (margin + s_m - pos).clamp(min=0).masked_fill(banned, 0.0)
    cost_t = (margin + s_t - pos).clamp(min=0).masked_fill(banned, 0.0)
    if max_violation:
        per_query = cost_m.max(dim=1).values + cost_t.max(dim=1).values  # [B]
    else:
        per_query = cost_m.sum(dim=1) + cost_t.sum(dim=1)
    if reduction == "sum":
        return rank_and_world()[1] * (weight * per_query).sum()
    return norm * (weight * per_query).sum()


def _check(where: str, reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"{where}.reduction: must be mean or sum, got {reduction!r}")


@dataclass
class VSETripletLossConfig:
    pairs: list[list[str]] = field(default_factory=lambda: [["image", "text"]])
    margin: float = 0.2
    max_violation: bool = True
    reduction: str = "mean"  # mean | sum (VSE++ sums over the batch)
    RANGES: ClassVar[dict] = {"margin": ">= 0"}
    name: str = field(default="vse_triplet", init=False)

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.pairs):
            check_pair(pair, f"{where}.pairs[{i}]")
        _check(where, self.reduction)


@LOSSES.register("vse_triplet", config=VSETripletLossConfig)
class VSETripletLoss(nn.Module):
    @staticmethod
    def reads(cfg: VSETripletLossConfig, model) -> set[str]:
        return paired_modalities(cfg.pairs, model.modalities)

    def __init__(self, cfg: VSETripletLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.pairs = covered_pairs(cfg.pairs, modalities)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        total, terms = None, {}
        device = outputs[self.pairs[0][0]].device
        groups = batch.groups(device)
        for a, b in self.pairs:
            valid = batch.mask(a).to(device) & batch.mask(b).to(device)
            loss = triplet_local(outputs[a], outputs[b], valid, self.cfg.margin, self.cfg.max_violation, groups,
                                 self.cfg.reduction)
            terms[f"{pair_name(a, b)}_loss"] = loss
            total = loss if total is None else total + loss
        return {"loss": total, **terms}


@dataclass
class VSELossConfig:
    media: str = "image"
    objective: str = "triplet"  # triplet | infonce, for the global and the alignment scores
    margin: float = 0.2
    max_violation: bool = True
    reduction: str = "mean"
    global_weight: float = 1.0
    align_weight: float = 1.0
    fusion_weight: float = 1.0
    init_logit_scale: float = math.log(1 / 0.07)  # objective: infonce
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"margin": ">= 0", "global_weight": ">= 0", "align_weight": ">= 0",
                              "fusion_weight": ">= 0", "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="vse", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.objective not in ("triplet", "infonce"):
            raise ConfigError(f"{where}.objective: must be triplet or infonce, got {self.objective!r}")
        _check(where, self.reduction)


@LOSSES.register("vse", config=VSELossConfig)
class VSELoss(nn.Module):
    @staticmethod
    def reads(cfg: VSELossConfig, model) -> set[str]:
        return {cfg.media, "text", "vse_align_scores", "vse_exclude", "vse_t2m_logits", "vse_m2t_logits", "vse_weight"}

    def __init__(self, cfg: VSELossConfig, modalities: list[str]):
        super().__init__()
        if cfg.media not in modalities or "text" not in modalities:
            raise ConfigError(f"loss.media: the vse loss needs {cfg.media} and text towers (model has {modalities})")
        self.cfg = cfg
        # temperatures only for InfoNCE (a parameter without gradient would upset ZeRO's hooks)
        self.logit_scale = nn.ParameterDict({k: nn.Parameter(torch.full((1,), cfg.init_logit_scale))
                                             for k in ("global", "align")} if cfg.objective == "infonce" else {})

    def _matrix_loss(self, S: torch.Tensor, exclude: torch.Tensor, key: str) -> torch.Tensor:
        c = self.cfg
        if c.objective == "triplet":
            return triplet_loss(S, c.margin, c.max_violation, exclude, c.reduction)
        scale = temperature(self.logit_scale[key], c.max_logit_scale)
        logits = (scale * at_least_fp32(S)).masked_fill(exclude, float("-inf"))
        target = torch.arange(S.shape[0], device=S.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        if "vse_align_scores" not in outputs:
            raise KeyError("the vse loss needs the vse head (model.heads: {vse: {name: vse}})")
        c, m = self.cfg, self.cfg.media
        device = outputs[m].device
        w = outputs["vse_weight"]
        valid = batch.mask(m).to(device) & batch.mask("text").to(device)
        groups = batch.groups(device)
        if c.objective == "triplet":
            glob = triplet_local(outputs[m], outputs["text"], valid, c.margin, c.max_violation, groups, c.reduction)
        else:
            from mlmm.losses.contrastive import masked_info_nce

            scale = temperature(self.logit_scale["global"], c.max_logit_scale)
            glob = masked_info_nce(outputs[m], outputs["text"], valid, scale, groups)
        align = self._matrix_loss(outputs["vse_align_scores"], outputs["vse_exclude"], "align") * w
        fusion = 0.5 * (interaction_ce(outputs["vse_t2m_logits"]) + interaction_ce(outputs["vse_m2t_logits"])) * w
        total = c.global_weight * glob + c.align_weight * align + c.fusion_weight * fusion
        return {"loss": total, "global_loss": glob, "align_loss": align, "fusion_loss": fusion}

    def temperatures(self) -> dict[str, float]:
        if self.cfg.objective != "infonce":
            return {}
        return {f"{k}_logit_scale": float(v.detach().exp()) for k, v in self.logit_scale.items()}
