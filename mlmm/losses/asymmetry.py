"""ASCL loss: asymmetry-sensitive contrastive learning on the ``hierarchical_fusion`` head's pair scores.

    loss:
      name: ascl
      media: image
      margins: {insert: 0.1, swap: 0.2, drop: 0.05}
      weights: {insert: 1.0, swap: 1.0, drop: 0.5}

With ``S`` [n, n] the fused scores of the batch (media i, caption j), ``E`` [n, K] the fused scores of media i with
the edits of its own caption and ``s = exp(logit_scale)``::

    global = InfoNCE(media, text) on the pooled embeddings (gathered across ranks)
    fused  = 0.5 * (CE(s * S[i, :], i) + CE(s * S[:, j], j))                  (non-negatives masked out)
    neg_k  = mean_i CE([s * S[i, :], s * (E[i, k] + m_k)], i)                  k = insert (text says more), swap
    drop   = mean_i relu(m_drop - S[i, i] + E[i, drop]) + CE([s * E[i, drop], s * (E[i, k] + m_k) for k != drop], 0)
    loss   = global_weight * global + fused_weight * fused + sum_k weights[k] * term_k

With ``edit_levels: both`` (default) every edit term is computed on the fused scores and again on the global cosines
(``ascl_global`` / ``ascl_edit_global``) and summed, so the pooled embeddings used for first-stage retrieval learn
the asymmetries directly, not only through the fused score.

A negative edit is an extra candidate whose score is raised by its margin before the softmax, so the true caption
must beat it by at least ``m_k``. A dropped-attribute caption (the text says less) is a *weaker* positive: it trails
the full caption by ``m_drop`` and beats the row's negative edits by their margins (it is also true of other images,
so other rows' captions are not its negatives). Rows without a valid edit of a kind are
left out of that term's mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.word_edits import EDIT_KINDS
from mlmm.losses.contrastive import at_least_fp32, media_text_term, temperature
from mlmm.registry import LOSSES

NEG = float("-inf")


@dataclass
class ASCLLossConfig:
    media: str = "image"
    global_weight: float = 1.0
    fused_weight: float = 1.0
    edit_levels: str = "both"  # fused | both: the edit terms on the fused scores (and on the global cosines)
    margins: dict = field(default_factory=lambda: {"insert": 0.1, "swap": 0.2, "drop": 0.05})
    weights: dict = field(default_factory=lambda: {"insert": 1.0, "swap": 1.0, "drop": 0.5})
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"global_weight": ">= 0", "fused_weight": ">= 0", "margins": ">= 0", "weights": ">= 0",
                              "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="ascl", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.edit_levels not in ("fused", "both"):
            raise ConfigError(f"{where}.edit_levels: must be fused or both, got {self.edit_levels!r}")
        for key in ("margins", "weights"):
            d = getattr(self, key)
            bad = [k for k in d if k not in EDIT_KINDS]
            if bad:
                raise ConfigError(f"{where}.{key}: unknown edit kinds {bad} (have {list(EDIT_KINDS)})")


def fused_infonce(S: torch.Tensor, scale: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on a [n, n] score matrix (diagonal = positives; ``exclude`` pairs masked out)."""
    logits = (scale * at_least_fp32(S)).masked_fill(exclude, NEG)  # fp32 in a bf16 run
    target = torch.arange(S.shape[0], device=S.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def negative_edit_term(S: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                       exclude: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over valid rows of CE([s*S[i, :], s*(e[i] + margin)], i); e, valid: [n]."""
    if not bool(valid.any()):
        return S.sum() * 0.0
    S, e = at_least_fp32(S), at_least_fp32(e)
    logits = torch.cat([(scale * S).masked_fill(exclude, NEG), (scale * (e + margin))[:, None]], 1)  # [n, n+1]
    target = torch.arange(S.shape[0], device=S.device)
    return F.cross_entropy(logits[valid], target[valid])


def drop_term(S: torch.Tensor, e: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
              negatives: list[tuple[torch.Tensor, torch.Tensor, float]], margin: float) -> torch.Tensor:
    """Weaker positive e [n] (valid Bool[n]): it trails the full caption by ``margin`` and beats the row's negative
    edits ``negatives`` = [(scores [n], valid Bool[n], margin_k)] by their margins.

    ``relu(margin - S[i, i] + e[i]) + CE([s*e[i], s*(neg_k[i] + m_k) for valid k], 0)``, mean over valid rows. Only
    the row's own captions are compared: a less specific caption is also true of other images in the batch, so other
    rows' captions are not negatives for it.
    """
    if not bool(valid.any()):
        return S.sum() * 0.0
    S, e = at_least_fp32(S), at_least_fp32(e)
    negatives = [(at_least_fp32(n_), v, m) for n_, v, m in negatives]
    hinge = F.relu(margin - S.diagonal() + e)[valid].mean()
    cols = [(scale * (n_ + m)).masked_fill(~(v & valid), NEG) for n_, v, m in negatives]  # each [n]
    if not cols:
        return hinge
    logits = torch.stack([scale * e, *cols], 1)[valid]  # [n_valid, 1 + k]
    has_neg = torch.isfinite(logits[:, 1:]).any(1)
    if not bool(has_neg.any()):
        return hinge
    target = torch.zeros(int(has_neg.sum()), dtype=torch.long, device=S.device)
    return hinge + F.cross_entropy(logits[has_neg], target)


@LOSSES.register("ascl", config=ASCLLossConfig)
class ASCLLoss(nn.Module):
    @staticmethod
    def reads(cfg: ASCLLossConfig, model) -> set[str]:
        return {cfg.media, "text", "ascl_scores", "ascl_edit_scores", "ascl_edit_valid", "ascl_exclude", "ascl_weight",
                "ascl_edit_kinds", *(("ascl_global", "ascl_edit_global") if cfg.edit_levels != "fused" else ())}

    def __init__(self, cfg: ASCLLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.contrastive = media_text_term(cfg, modalities)
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale), requires_grad=cfg.learn_temperature)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        S, E, valid = outputs["ascl_scores"], outputs["ascl_edit_scores"], outputs["ascl_edit_valid"]
        exclude, w = outputs["ascl_exclude"], outputs["ascl_weight"]
        scale = temperature(self.logit_scale, self.cfg.max_logit_scale)
        glob = self.contrastive(outputs, batch)["loss"]
        fused = fused_infonce(S, scale, exclude) * w
        terms = {"global_loss": glob, "fused_loss": fused}
        total = self.cfg.global_weight * glob + self.cfg.fused_weight * fused
        kinds = outputs["ascl_edit_kinds"].tolist()
        levels = [(S, E)] if self.cfg.edit_levels == "fused" else [(S, E), (outputs["ascl_global"],
                                                                              outputs["ascl_edit_global"])]
        margins = [float(self.cfg.margins.get(EDIT_KINDS[k], 0.0)) for k in kinds]
        for code in sorted(set(kinds)):  # a kind repeated in the head's edits: mean over its columns
            kind, cols = EDIT_KINDS[code], [c for c, k in enumerate(kinds) if k == code]
            margin = float(self.cfg.margins.get(kind, 0.0))
            term = 0.0
            for s_, e_ in levels:
                for c in cols:
                    if kind == "drop":
                        negs = [(e_[:, j], valid[:, j], margins[j]) for j, k in enumerate(kinds)
                                if EDIT_KINDS[k] != "drop"]
                        term = term + drop_term(s_, e_[:, c], valid[:, c], scale, negs, margin)
                    else:
                        term = term + negative_edit_term(s_, e_[:, c], valid[:, c], scale, exclude, margin)
            term = term / len(cols) * w
            terms[f"{kind}_loss"] = term
            total = total + float(self.cfg.weights.get(kind, 1.0)) * term
        with torch.no_grad():  # how often the true caption beats each negative edit
            for code in sorted(set(kinds) - {EDIT_KINDS.index("drop")}):
                cols = [c for c, k in enumerate(kinds) if k == code]
                v = valid[:, cols]  # [n, c]
                if bool(v.any()):
                    terms[f"{EDIT_KINDS[code]}_acc"] = (S.diagonal()[:, None] > E[:, cols])[v].float().mean()
        return {"loss": total, **terms}

    def temperatures(self) -> dict[str, float]:
        return {**self.contrastive.temperatures(), "fused_logit_scale": float(self.logit_scale.detach().exp())}
