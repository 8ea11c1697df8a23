"""Symmetric InfoNCE (CLIP) over every configured modality pair, with a learnable temperature each.

For a pair (a, b) the loss uses the rows of the batch where both modalities are present. Features
are gathered across data-parallel ranks *with gradient* (open_clip's ``gather_with_grad``) so every
rank sees the global batch of negatives; each rank computes the loss for its own rows
(``local_loss``), which gives the same gradient as the full matrix at 1/world of the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlmm.config import MODALITIES, ConfigError
from mlmm.data.batch import Batch
from mlmm.registry import LOSSES


@dataclass
class ContrastiveLossConfig:
    pairs: list[list[str]] = field(default_factory=lambda: [["image", "text"], ["video", "text"],
                                                            ["audio", "text"], ["audio", "video"]])
    weights: dict = field(default_factory=dict)  # "<a>_<b>": weight (default 1.0)
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    name: str = field(default="contrastive", init=False)

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or any(m not in MODALITIES for m in pair) or pair[0] == pair[1]:
                raise ConfigError(f"{where}.pairs[{i}]: expected two different modalities of {MODALITIES}, got {pair}")


def pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 keeping the autograd graph (equal-sized chunks per rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(x), dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over a [N, N] similarity matrix whose diagonal holds the positives.

    a, b: [N, D] L2-normalised embeddings, row i of `a` pairs with row i of `b`.
    """
    logits = logit_scale * a @ b.t()  # [N, N]
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def key_groups(keys: list[str], device: torch.device) -> torch.Tensor:
    """Stable int64 id per sample key: [B]. Rows sharing a key (one sample, several languages) match."""
    import zlib

    return torch.tensor([zlib.crc32(k.encode("utf-8")) for k in keys], dtype=torch.long, device=device)


def masked_info_nce(a_local: torch.Tensor, b_local: torch.Tensor, valid_local: torch.Tensor,
                    logit_scale: torch.Tensor, groups_local: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE on the global batch restricted to valid rows; each rank scores its own valid rows.

    a_local, b_local: [B, D] this rank's embeddings; valid_local: [B] bool (both modalities present).
    groups_local: optional [B] ids; other rows of the same group are not used as negatives (the
    `all_languages` policy puts one sample in a batch once per language).
    Returns the mean loss over this rank's valid rows (0 with a grad path when it has none).
    """
    a_all, b_all = gather_with_grad(a_local), gather_with_grad(b_local)  # [W*B, D]
    valid_all = gather_no_grad(valid_local)  # [W*B]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    B = a_local.shape[0]
    global_index = torch.arange(valid_all.numel(), device=valid_all.device)
    keep = global_index[valid_all]  # global rows taking part
    mine = (keep >= rank * B) & (keep < (rank + 1) * B)  # which of them are this rank's
    if keep.numel() < 2 or not bool(mine.any()):
        return 0.0 * (a_local.sum() + b_local.sum())
    a_g, b_g = a_all[keep], b_all[keep]  # [N, D]
    labels = torch.nonzero(mine).squeeze(1)  # positions of my rows inside the kept set
    logits_ab = logit_scale * a_g[labels] @ b_g.t()  # [n_mine, N]
    logits_ba = logit_scale * b_g[labels] @ a_g.t()  # [n_mine, N]
    if groups_local is not None:
        groups = gather_no_grad(groups_local)[keep]  # [N]
        same = groups[labels].unsqueeze(1) == groups.unsqueeze(0)  # [n_mine, N]
        same[torch.arange(labels.numel(), device=same.device), labels] = False  # keep the positive
        if bool(same.any()):
            logits_ab = logits_ab.masked_fill(same, float("-inf"))
            logits_ba = logits_ba.masked_fill(same, float("-inf"))
    return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))


def covered_pairs(pairs: list[list[str]], modalities: list[str]) -> list[tuple[str, str]]:
    """The configured ``loss.pairs`` whose two towers the model has; ConfigError when none is."""
    out = [(a, b) for a, b in pairs if a in modalities and b in modalities]
    if not out:
        raise ConfigError(f"loss.pairs: none of {pairs} is covered by the model's towers {modalities}")
    return out


@LOSSES.register("contrastive", config=ContrastiveLossConfig)
class ContrastiveLoss(nn.Module):
    """CLIP loss for each configured pair present in the model; returns ``{"loss", "<a>_<b>_loss"}``."""

    def __init__(self, cfg: ContrastiveLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.pairs = covered_pairs(cfg.pairs, modalities)
        self.logit_scale = nn.ParameterDict({
            # shape [1], not []: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes
            pair_name(a, b): nn.Parameter(torch.full((1,), cfg.init_logit_scale), requires_grad=cfg.learn_temperature)
            for a, b in self.pairs
        })

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        total, terms = None, {}
        groups = key_groups(batch.keys, outputs[self.pairs[0][0]].device) if batch.keys else None
        for a, b in self.pairs:
            name = pair_name(a, b)
            valid = batch.mask(a).to(outputs[a].device) & batch.mask(b).to(outputs[a].device)
            scale = self.logit_scale[name].clamp(max=self.cfg.max_logit_scale).exp().squeeze(0)
            loss = masked_info_nce(outputs[a], outputs[b], valid, scale, groups)
            terms[f"{name}_loss"] = loss
            total = loss * self.cfg.weights.get(name, 1.0) + (0 if total is None else total)
        return {"loss": total, **terms}

    def temperatures(self) -> dict[str, float]:
        return {f"{k}_logit_scale": float(v.detach().exp().squeeze(0)) for k, v in self.logit_scale.items()}
