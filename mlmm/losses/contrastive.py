"""Symmetric InfoNCE (CLIP) over every configured modality pair, with a learnable temperature each.

For a pair (a, b) the loss uses the rows of the batch where both modalities are present. Features
are gathered across data-parallel ranks *with gradient* (open_clip's ``gather_with_grad``) so every
rank sees the global batch of negatives; each rank computes the loss for its own rows
(``local_loss``), which gives the same gradient as the full matrix at 1/world of the cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.modalities import MODALITIES
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
    RANGES: ClassVar[dict] = {"weights": ">= 0", "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="contrastive", init=False)

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.pairs):
            check_pair(pair, f"{where}.pairs[{i}]")


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


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32 (the loss math of a bf16 run); fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def temperature(log_scale: torch.Tensor, max_log_scale: float) -> torch.Tensor:
    """The logit scale ``exp(min(log_scale, max_log_scale))`` of a learnable temperature (parameter [1]) as an fp32
    0-dim tensor, also when DeepSpeed's bf16 mode holds the parameter in bf16 (one bf16 step at 100 is 0.5)."""
    return at_least_fp32(log_scale).clamp(max=max_log_scale).exp().squeeze(0)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_vs_global(valid_local: torch.Tensor, groups_local: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a loss that scores this rank's rows against the gathered global batch needs, with no data-dependent
    shape or branch: every rank runs the same collectives and builds the same autograd graph whatever its rows hold
    (a rank that skipped the gather's backward would leave the others waiting forever).

    valid_local: Bool[B] rows taking part; groups_local: optional Long[B] ids (rows of one group are not each
    other's negatives). Returns ``labels`` Long[B] (my rows' positions in the global batch), ``allowed``
    Bool[B, W*B] (the columns each of my rows is scored against: valid rows outside its group, and always its own
    positive, which keeps every row finite), ``weight`` [B] (1 on my valid rows) and ``norm`` = W / max(N, 1)
    with N the global number of valid rows: ``norm * (weight * row_loss).sum()`` is this rank's share of the
    global-batch mean, so the data-parallel mean of the gradients (DeepSpeed averages them) and the mean over ranks
    of the values equal a single process over the global batch.
    """
    rank, world = rank_and_world()
    B, device = valid_local.shape[0], valid_local.device
    valid_all = gather_no_grad(valid_local)  # [W*B]
    labels = torch.arange(B, device=device) + rank * B  # [B]
    allowed = valid_all.unsqueeze(0).expand(B, -1).clone()  # [B, W*B]
    if groups_local is not None:
        groups = gather_no_grad(groups_local)  # [W*B]
        allowed &= groups[labels].unsqueeze(1) != groups.unsqueeze(0)
    allowed[torch.arange(B, device=device), labels] = True
    norm = world / valid_all.sum().to(dtype).clamp(min=1)  # (in the loss's dtype: fp64 stays exact)
    return labels, allowed, valid_local.to(dtype), norm


def masked_info_nce(a_local: torch.Tensor, b_local: torch.Tensor, valid_local: torch.Tensor,
                    logit_scale: torch.Tensor, groups_local: Optional[torch.Tensor] = None) -> torch.Tensor:
    """InfoNCE on the global batch restricted to valid rows; each rank scores its own valid rows.

    a_local, b_local: [B, D] this rank's embeddings; valid_local: [B] bool (both modalities present).
    groups_local: optional [B] ids; other rows of the same group are not used as negatives (the
    `all_languages` policy puts one sample in a batch once per language).
    Returns this rank's share of the mean loss over the global batch's valid rows (:func:`local_vs_global`; 0
    when fewer than two rows are valid). Similarities, scale and cross-entropy are fp32 whatever the embeddings'
    dtype: in bf16, logits of 32-128 would round in steps of 0.25-0.5.
    """
    a_all, b_all = at_least_fp32(gather_with_grad(a_local)), at_least_fp32(gather_with_grad(b_local))  # [W*B, D]
    labels, allowed, weight, norm = local_vs_global(valid_local, groups_local, a_all.dtype)
    scale = at_least_fp32(logit_scale)
    logits_ab = (scale * a_all[labels] @ b_all.t()).masked_fill(~allowed, float("-inf"))  # [B, W*B]
    logits_ba = (scale * b_all[labels] @ a_all.t()).masked_fill(~allowed, float("-inf"))  # [B, W*B]
    per_row = 0.5 * (F.cross_entropy(logits_ab, labels, reduction="none")
                     + F.cross_entropy(logits_ba, labels, reduction="none"))  # [B]
    return norm * (weight * per_row).sum()


def check_pair(pair, where: str) -> None:
    """ConfigError naming ``where`` unless ``pair`` is two different registered modalities."""
    if len(pair) != 2 or any(m not in MODALITIES for m in pair) or pair[0] == pair[1]:
        raise ConfigError(f"{where}: expected two different modalities of {MODALITIES}, got {pair}")


def paired_modalities(pairs: list[list[str]], modalities: list[str]) -> set[str]:
    """The modalities of the configured pairs whose two towers the model has: what a pair loss reads."""
    return {m for pair in covered_pairs(pairs, modalities) for m in pair}


def covered_pairs(pairs: list[list[str]], modalities: list[str]) -> list[tuple[str, str]]:
    """The configured ``loss.pairs`` whose two towers the model has; ConfigError when none is."""
    out = [(a, b) for a, b in pairs if a in modalities and b in modalities]
    if not out:
        raise ConfigError(f"loss.pairs: none of {pairs} is covered by the model's towers {modalities}")
    return out


@LOSSES.register("contrastive", config=ContrastiveLossConfig)
class ContrastiveLoss(nn.Module):
    """CLIP loss for each configured pair present in the model; returns ``{"loss", "<a>_<b>_loss"}``."""

    @staticmethod
    def reads(cfg: ContrastiveLossConfig, model) -> set[str]:
        return paired_modalities(cfg.pairs, model.modalities)

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
        groups = batch.groups(outputs[self.pairs[0][0]].device)
        for a, b in self.pairs:
            name = pair_name(a, b)
            valid = batch.mask(a).to(outputs[a].device) & batch.mask(b).to(outputs[a].device)
            scale = temperature(self.logit_scale[name], self.cfg.max_logit_scale)
            loss = masked_info_nce(outputs[a], outputs[b], valid, scale, groups)
            terms[f"{name}_loss"] = loss
            total = loss * self.cfg.weights.get(name, 1.0) + (0 if total is None else total)
        return {"loss": total, **terms}

    def temperatures(self) -> dict[str, float]:
        return {f"{k}_logit_scale": float(v.detach().exp().squeeze(0)) for k, v in self.logit_scale.items()}


def media_text_term(cfg, modalities: list[str]) -> ContrastiveLoss:
    """The global (``cfg.media``, text) InfoNCE that the pair-scoring losses (DI-vTR, ASCL, MVSEN) add to their own
    terms, with their temperature settings (``learn_temperature``, ``init_logit_scale``, ``max_logit_scale``)."""
    return ContrastiveLoss(ContrastiveLossConfig(pairs=[[cfg.media, "text"]], learn_temperature=cfg.learn_temperature,
                                                 init_logit_scale=cfg.init_logit_scale,
                                                 max_logit_scale=cfg.max_logit_scale), modalities)
