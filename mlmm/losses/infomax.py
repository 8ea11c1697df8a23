"""Deep InfoMax estimators (Hjelm et al., ICLR 2019) and the composed-retrieval loss that uses them.

Given n global vectors ``g`` [n, D] and the local features of the same n samples ``l`` [n, T, D]
(with a validity mask [n, T]), the critic is "encode and dot": ``s[i, j, t] = g_i . l_{j, t}`` (the
encoders live in the head). Pairs (i, i, t) are drawn from the joint, (i, j != i, t) from the product
of marginals. Two estimators, as DIM's ``fenchel_dual_loss`` / ``infonce_loss``:

* **JSD** (``jsd_mi_loss``): ``E_neg[sp(s)] - E_pos[-sp(-s)] - 2 log 2`` = minus the Jensen-Shannon MI
  estimate, where each (i, j) pair first averages over the valid locals of j, then positives and negatives
  are averaged over their pairs;
* **InfoNCE** (``infonce_mi_loss``): for every valid local (i, t), cross-entropy of the positive score
  ``s[i, i, t]`` against all valid locals of the other samples ``s[i, j, t']`` (j != i) — DIM fills
  those slots with ``-10``, here they are excluded exactly.

``exclude`` Bool[n, n] marks pairs (i, j != i) that are neither positive nor negative (e.g. two rows of
one sample in different languages).

The registered ``composed`` loss: InfoNCE between the composed query and the target image
(:func:`~mlmm.losses.contrastive.masked_info_nce`, gathered across ranks; rows whose target is the same
image are not each other's negatives) + ``dim_weight`` x the DIM estimator between the fused global
vector and every local source the ``composed`` head projects (reference patches, modification words,
optionally target patches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch, string_ids
from mlmm.losses.contrastive import masked_info_nce, temperature
from mlmm.registry import LOSSES

LOG2 = math.log(2.0)


def dim_scores(g: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """g [n, D], l [n, T, D] -> s [n, n, T] with s[i, j, t] = g_i . l_{j, t}."""
    return torch.einsum("id,jtd->ijt", g, l)


def _pair_masks(n: int, exclude: Optional[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.eye(n, dtype=torch.bool, device=device)  # [n, n]
    neg = ~pos if exclude is None else ~pos & ~exclude.to(device)
    return pos, neg


def jsd_mi_loss(g: torch.Tensor, l: torch.Tensor, mask: torch.Tensor, exclude: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Minus DIM's Jensen-Shannon MI estimate between globals g [n, D] and locals l [n, T, D] (mask Bool[n, T])."""
    n = g.shape[0]
    s = dim_scores(g, l)  # [n, n, T]
    m = mask.to(s.dtype)[None]  # [1, n, T]: locals of sample j
    count = m.sum(2).clamp_min(1)  # [1, n]
    e_pos = ((LOG2 - F.softplus(-s)) * m).sum(2) / count  # [n, n]: E over locals of j, per pair (i, j)
    e_neg = ((F.softplus(s) - LOG2) * m).sum(2) / count
    pos, neg = _pair_masks(n, exclude, g.device)
    pos, neg = pos & mask.any(1)[None], neg & mask.any(1)[None]  # samples without a local take no part
    e_pos = (e_pos * pos).sum() / pos.sum().clamp_min(1)
    e_neg = (e_neg * neg).sum() / neg.sum().clamp_min(1)
    return e_neg - e_pos


def infonce_mi_loss(g: torch.Tensor, l: torch.Tensor, mask: torch.Tensor, exclude: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """DIM's InfoNCE: each valid local (i, t) must pick g_i's score over all valid locals of other samples."""
    n, T = mask.shape
    s = dim_scores(g, l)  # [n, n, T]
    u_pos = torch.diagonal(s).t()  # [n, T]: s[i, i, t]
    _, neg = _pair_masks(n, exclude, g.device)
    keep = neg[:, :, None] & mask[None]  # [n, n, T]: negatives of global i
    u_neg = s.masked_fill(~keep, float("-inf")).reshape(n, 1, n * T).expand(n, T, n * T)  # [n, T, n*T]
    logits = torch.cat([u_pos.unsqueeze(2), u_neg], dim=2)  # [n, T, 1 + n*T]
    nll = -torch.log_softmax(logits, dim=2)[..., 0]  # [n, T]
    valid = mask.to(nll.dtype)
    return (nll * valid).sum() / valid.sum().clamp_min(1)


ESTIMATORS = {"jsd": jsd_mi_loss, "infonce": infonce_mi_loss}


@dataclass
class ComposedLossConfig:
    retrieval_weight: float = 1.0
    dim_weight: float = 0.1  # 0 = retrieval loss only
    estimator: str = "jsd"  # jsd | infonce
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"retrieval_weight": ">= 0", "dim_weight": ">= 0", "init_logit_scale": "any",
                              "max_logit_scale": "any"}
    name: str = field(default="composed", init=False)

    def validate(self, where: str) -> None:
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"{where}.estimator: must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")


@LOSSES.register("composed", config=ComposedLossConfig)
class ComposedLoss(nn.Module):
    """Reads the ``composed`` head's outputs (all [B, ...], zeros on rows without a triplet):
    ``composed_query`` [B, E], ``composed_valid`` Bool[B], ``composed_dim_global`` [B, D] and, per local
    source, ``composed_dim_<source>`` [B, T, D] + ``composed_dim_<source>_mask`` Bool[B, T]; the target is
    the model's ``image`` embedding [B, E]."""

    @staticmethod
    def reads(cfg: ComposedLossConfig, model) -> set[str]:
        sources = [s for h in model.heads.values() if h.name == "composed" for s in h.dim_sources]
        return {"image", "composed_query", "composed_valid", "composed_dim_global",
                *(f"composed_dim_{s}{x}" for s in sources for x in ("", "_mask"))}

    def __init__(self, cfg: ComposedLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale), requires_grad=cfg.learn_temperature)

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        q, valid = outputs["composed_query"], outputs["composed_valid"]  # [B, E], Bool[B]
        # rows whose target is the same gallery image (or the same sample) are not each other's negatives
        targets = [str((batch.meta[r] if batch.meta else {}).get("target", batch.keys[r])) for r in range(len(batch))]
        groups = string_ids(targets, q.device)  # [B]
        scale = temperature(self.logit_scale, self.cfg.max_logit_scale)
        retrieval = masked_info_nce(q, outputs["image"], valid, scale, groups)
        terms = {"retrieval_loss": retrieval}
        total = self.cfg.retrieval_weight * retrieval
        idx = torch.nonzero(valid).squeeze(1)  # [n] this rank's triplet rows (DIM is computed per rank)
        same = groups[idx, None] == groups[None, idx]  # [n, n]
        g = outputs["composed_dim_global"]
        for key in sorted(k for k in outputs if k.startswith("composed_dim_") and k.endswith("_mask")):
            source = key[len("composed_dim_"): -len("_mask")]
            local = outputs[f"composed_dim_{source}"]
            if idx.numel() == 0:  # keep the graph: every parameter gets a (zero) gradient
                mi = 0.0 * (g.sum() + local.sum())
            else:
                mi = ESTIMATORS[self.cfg.estimator](g[idx], local[idx], outputs[key][idx], same)
            terms[f"dim_{source}_loss"] = mi
            total = total + self.cfg.dim_weight * mi
        return {"loss": total, **terms}

    def temperatures(self) -> dict[str, float]:
        return {"composed_logit_scale": float(self.logit_scale.detach().exp().squeeze(0))}
