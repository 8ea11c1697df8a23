"""RCAR-style learning with noisy correspondence: loss memory -> beta mixture -> soft targets + complementary loss.

    loss:
      name: rcar
      pair: [image, text]
      warmup_steps: 20        # plain InfoNCE while the loss memory fills
      refit_every: 10         # refit the BMM every 10 training steps (the "epoch" of a streaming run)
      soft_labels: true       # target = w_i on the positive, (1 - w_i) spread over the in-batch negatives
      downweight: true        # and scale the row's soft InfoNCE by w_i
      complementary_weight: 1.0
      complementary_on: noisy # complementary contrastive loss on every row (all) or weighted by 1 - w_i (noisy)

Per training step, for every row i of the pair (image_i, text_i) in the global batch (gathered with
gradient across ranks, each rank scoring its own rows as :func:`~mlmm.losses.contrastive.masked_info_nce`):

1. **memory** — the per-sample symmetric InfoNCE ``l_i = (CE(i->t) + CE(t->i)) / 2`` (detached) is stored
   under the sample key (latest value per key) in a :class:`~mlmm.losses.loss_memory.LossMemory` bounded to
   ``memory_size`` samples (28 bytes each; the samples recorded longest ago are dropped first);
2. **BMM** — mlmm streams without epochs, so the per-epoch refit of the papers becomes: after
   ``warmup_steps`` steps, and then every ``refit_every`` steps, a two-component beta mixture
   (:mod:`mlmm.losses.bmm`) is fitted by EM on the min-max-normalised memory; each key's clean
   posterior ``w = P(clean | l)`` is kept until the next refit (keys not seen yet, or dropped from the memory,
   count as clean, w = 1). With several ranks, each refit all-gathers, as tensors, only the rows every rank
   recorded since the previous refit, and every rank folds them into its copy of the memory, so every rank
   fits the same model;
3. **split + soft targets** — rows with ``w_i >= clean_threshold`` form the clean split and keep their
   hard InfoNCE target (``w_i := 1``). A row of the noisy split is re-labelled: its target puts ``w_i``
   on its positive and spreads ``1 - w_i`` uniformly over its allowed negatives (other rows of the same
   sample are never negatives), in both directions; with ``downweight`` its term is multiplied by ``w_i``;
4. **complementary contrastive loss** (RCL, Hu et al. TPAMI 2023) — ``-sum_{j != i} log(1 - p_ij)``
   with ``p`` the softmax over the row: it only pushes negatives away, so a wrong "positive" cannot be
   memorised through it; applied to every row (``all``) or weighted by ``1 - w_i`` (``noisy``: the noisy split only).

Total: ``mean_i(d_i * soft_i) + complementary_weight * mean_i(c_i * comp_i)``.

The memory, the posteriors, the BMM and the step counter are the module's ``extra_state``, so they
are saved in DeepSpeed checkpoints and restored on resume (DeepSpeed saves the module state of rank 0: the
rows other ranks recorded since the last refit are not in the checkpoint; those samples count as unseen
until they are recorded again). "Steps" are training-mode forward calls
(micro-batches when ``train.grad_accum`` > 1).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.losses.bmm import BetaMixture, normalise_losses
from mlmm.losses.contrastive import at_least_fp32, check_pair, gather_with_grad, local_vs_global, temperature
from mlmm.losses.loss_memory import LossMemory, key_hashes
from mlmm.registry import LOSSES

log = logging.getLogger(__name__)


@dataclass
class RCARLossConfig:
    pair: list[str] = field(default_factory=lambda: ["image", "text"])
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    warmup_steps: int = 20  # plain InfoNCE (w = 1) until the first BMM fit
    refit_every: int = 10  # steps between BMM refits (the epoch analogue)
    # samples the loss memory keeps (28 bytes each: 1 << 20 = 28 MiB); past it the samples recorded longest ago are
    # dropped (they count as clean until recorded again): set it to at least the samples of one pass over the data
    memory_size: int = 1 << 20
    bmm_iters: int = 50  # EM iterations per fit (Arazo et al. use 10; 50 converges on 2-3k samples)
    min_memory: int = 32  # do not fit with fewer recorded samples
    clean_threshold: float = 0.5  # rows with w >= this are the clean split: hard target, weight 1
    soft_labels: bool = True
    downweight: bool = True
    complementary_weight: float = 1.0
    complementary_on: str = "noisy"  # all | noisy
    RANGES: ClassVar[dict] = {"init_logit_scale": "any", "max_logit_scale": "any", "warmup_steps": ">= 0",
                              "refit_every": ">= 1", "memory_size": ">= 2", "bmm_iters": ">= 1", "min_memory": ">= 1",
                              "clean_threshold": "[0, 1]", "complementary_weight": ">= 0"}
    name: str = field(default="rcar", init=False)

    def validate(self, where: str) -> None:
        check_pair(self.pair, f"{where}.pair")
        if self.memory_size < max(self.min_memory, 2):
            raise ConfigError(f"{where}.memory_size: must be >= min_memory ({self.min_memory}), got {self.memory_size}")
        if self.complementary_on not in ("all", "noisy"):
            raise ConfigError(f"{where}.complementary_on: must be 'all' or 'noisy', got {self.complementary_on!r}")


# ------------------------------------------------------------------------------------------ terms
def soft_targets(allowed: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Target rows: ``w`` on the positive column ``labels``, ``1 - w`` spread over the other allowed columns.

    allowed Bool[n, N] (the positive included), labels Long[n], w Float[n] -> Float[n, N] (rows sum to 1;
    a row without any negative keeps all its mass on the positive).
    """
    n = labels.numel()
    ar = torch.arange(n, device=labels.device)
    neg = allowed.clone()
    neg[ar, labels] = False
    n_neg = neg.sum(1)  # [n]
    w = torch.where(n_neg > 0, w, torch.ones_like(w))
    target = neg.to(w.dtype) * ((1 - w) / n_neg.clamp_min(1)).unsqueeze(1)  # [n, N]
    target[ar, labels] = w
    return target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row ``-sum_j target_j log softmax(logits)_j`` over allowed columns: [n, N] -> [n]."""
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
    return -(target * logp.masked_fill(~allowed, 0.0)).sum(1)


def complementary_loss(logits: torch.Tensor, allowed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row ``-sum_{j allowed, j != label} log(1 - p_j)``, p = softmax over allowed columns: -> [n]."""
    n = labels.numel()
    logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)  # [n, N]
    neg = allowed.clone()
    neg[torch.arange(n, device=labels.device), labels] = False
    logp = logp.masked_fill(~neg, -1.0).clamp(max=-1e-6)  # placeholder on unused slots; p < 1
    # log(1 - exp(x)) computed stably (Maechler's log1mexp): expm1 near 0, log1p far from it
    log1m = torch.where(logp > -math.log(2.0), torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    return -(log1m.masked_fill(~neg, 0.0)).sum(1)


# ------------------------------------------------------------------------------------------ loss
@LOSSES.register("rcar", config=RCARLossConfig)
class RCARLoss(nn.Module):
    @staticmethod
    def reads(cfg: RCARLossConfig, model) -> set[str]:
        return set(cfg.pair)

    def __init__(self, cfg: RCARLossConfig, modalities: list[str]):
        super().__init__()
        missing = [m for m in cfg.pair if m not in modalities]
        if missing:
            raise ConfigError(f"loss.pair: the model has no {missing} tower (towers: {modalities})")
        self.cfg = cfg
        self.a, self.b = cfg.pair
        # shape [1]: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale), requires_grad=cfg.learn_temperature)
        self.steps = 0  # training forward calls
        self.memory = LossMemory(cfg.memory_size)  # latest per-sample loss + its clean posterior w at the last refit
        self.bmm: Optional[BetaMixture] = None
        self.fits = 0

    # ------------------------------------------------------------------------------ memory / BMM
    def record(self, keys: list[str], losses: torch.Tensor) -> None:
        self.memory.record(keys, losses, self.steps)

    def refit(self) -> Optional[BetaMixture]:
        """Merge every rank's new rows into the memory, fit the BMM on it and refresh every sample's clean posterior."""
        dropped = self.memory.dropped
        self.memory.merge()
        if self.memory.dropped and not dropped:
            log.warning("loss.memory_size=%d is full: the samples recorded longest ago are dropped and count as clean "
                        "(w = 1) until they are recorded again; set it to at least the samples of one pass over the "
                        "data (28 bytes each)", self.cfg.memory_size)
        if len(self.memory) < self.cfg.min_memory:
            return None
        x = normalise_losses(self.memory.losses)
        self.bmm = BetaMixture.fit(x, max_iter=self.cfg.bmm_iters)
        self.memory.set_posterior(self.bmm.clean_posterior(x))
        self.fits += 1
        return self.bmm

    def weights_for(self, keys: list[str], device, dtype) -> torch.Tensor:
        """Clean posterior of each key (1 before the first fit / for unseen keys): [n]."""
        w = self.memory.posterior(keys)
        return torch.where(torch.isnan(w), torch.ones_like(w), w).to(device=device, dtype=dtype)

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "fits": self.fits, "memory": self.memory.state(),
                "bmm": self.bmm.state() if self.bmm else None}

    def set_extra_state(self, state: dict) -> None:
        self.steps, self.fits = int(state["steps"]), int(state["fits"])
        memory = state["memory"]
        if "hashes" not in memory:  # a checkpoint of the dict memory ({key: (loss, step)} + {key: w})
            keys = list(memory)
            memory = {"hashes": key_hashes(keys), "losses": torch.tensor([memory[k][0] for k in keys]),
                      "steps": torch.tensor([int(memory[k][1]) for k in keys], dtype=torch.long),
                      "w": torch.tensor([state["clean_posterior"].get(k, float("nan")) for k in keys],
                                        dtype=torch.float64), "pending": torch.empty(0, 3, dtype=torch.long)}
            order = torch.argsort(memory["hashes"])
            memory = {k: v[order] if k != "pending" else v for k, v in memory.items()}
        self.memory.load(memory, device=self.logit_scale.device)
        self.bmm = BetaMixture.from_state(state["bmm"]) if state["bmm"] else None

    # ------------------------------------------------------------------------------ forward
    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        a_local, b_local = outputs[self.a], outputs[self.b]  # [B, E] each, L2-normalised
        device, B = a_local.device, a_local.shape[0]
        training = self.training and torch.is_grad_enabled()
        if training:
            self.steps += 1
            after_warmup = self.steps - self.cfg.warmup_steps - 1
            if after_warmup >= 0 and after_warmup % self.cfg.refit_every == 0:
                self.refit()
        valid_local = batch.mask(self.a).to(device) & batch.mask(self.b).to(device)  # [B]
        scale = temperature(self.logit_scale, self.cfg.max_logit_scale)
        a_all, b_all = at_least_fp32(gather_with_grad(a_local)), at_least_fp32(gather_with_grad(b_local))  # [W*B, E]
        # every rank scores all its B rows (invalid ones weighted 0): the same collectives and graph on every rank
        groups = batch.groups(device)  # same-sample rows are never negatives
        labels, allowed, valid_w, norm = local_vs_global(valid_local, groups, a_all.dtype)  # [B], [B, W*B], [B], []
        logits = {"ab": scale * a_all[labels] @ b_all.t(), "ba": scale * b_all[labels] @ a_all.t()}  # [B, W*B] each
        n_all = allowed.shape[1]
        per_sample = 0.5 * sum(soft_cross_entropy(l.detach(), F.one_hot(labels, n_all).to(l.dtype), allowed)
                               for l in logits.values())  # [B] plain InfoNCE per row
        keys = list(batch.keys) if batch.keys else [str(r) for r in range(B)]
        rows = sorted(set(batch.rows(self.a)) & set(batch.rows(self.b)))  # my valid rows (host ints, no sync)
        if training and rows:
            self.record([keys[r] for r in rows], per_sample[torch.tensor(rows).to(device, non_blocking=True)])
        w = self.weights_for(keys, device, per_sample.dtype)  # [B]
        w = torch.where(w >= self.cfg.clean_threshold, torch.ones_like(w), w)  # the clean split keeps its labels
        target = soft_targets(allowed, labels, w if self.cfg.soft_labels else torch.ones_like(w))
        soft = 0.5 * sum(soft_cross_entropy(l, target, allowed) for l in logits.values())  # [B]
        d = w if self.cfg.downweight else torch.ones_like(w)
        comp = 0.5 * sum(complementary_loss(l, allowed, labels) for l in logits.values())  # [B]
        c = torch.ones_like(w) if self.cfg.complementary_on == "all" else 1 - w
        # this rank's shares of the means over the global batch's valid rows (local_vs_global)
        soft_term, comp_term = norm * (valid_w * d * soft).sum(), norm * (valid_w * c * comp).sum()
        total = soft_term + self.cfg.complementary_weight * comp_term
        return {"loss": total, "rcar_loss": soft_term, "complementary_loss": comp_term,
                "clean_weight": ((valid_w * w).sum() / max(len(rows), 1)).detach() if rows else w.new_ones(())}

    def temperatures(self) -> dict[str, float]:
        return {f"{self.a}_{self.b}_logit_scale": float(self.logit_scale.detach().exp().squeeze(0))}
