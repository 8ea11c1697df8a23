"""Cross-modal hashing objective (DCMH-style), optionally with fine-grained token alignment (FGCMH-style).

    loss:
      name: hashing
      pairs: [[image, text]]
      similarity: labels          # labels | class | identity | auto
      quantization_weight: 1.0
      balance_weight: 0.1
      token_weight: 0.0           # > 0: word <-> patch alignment of the head's token features (source: tokens)

Terms for every configured pair (a, b) of hashed modalities, over the rows where each modality is present:

* ``pairwise`` (DCMH, Jiang & Li 2017): with ``Θ_ij = theta_scale · <h^a_i, h^b_j>`` and similarity
  ``S_ij ∈ {0, 1}``, the negative log-likelihood ``mean_ij [log(1 + e^Θ_ij) − S_ij Θ_ij]``. ``S_ij`` = 1 when
  the rows share a label of ``meta["labels"]`` (``labels``), have identical label sets (``class``), or come
  from the same sample key (``identity``; rows of one sample in several languages are similar, so
  captions of all languages are pulled to the same code). ``auto``: labels when every row has some, else
  identity. ``intra_weight`` adds the same term within each modality (a–a, b–b).
* ``quantization``: ``mean ‖sign(h) − h‖²`` per bit (DCMH's ``‖B − F‖²`` with B = sign(F)).
* ``balance``: ``mean_k (mean_i h_ik)²`` — each bit is +1 on half of the rows (DCMH's ``‖F·1‖²``).
* ``token`` (fine-grained): late-interaction similarity of the head's token features
  (``<codes>_<m>_tok``): ``s_ij = ½ [mean_{t∈i} max_{u∈j} <x_t, y_u> + mean_{u∈j} max_{t∈i} <x_t, y_u>]``
  (FILIP), scored with the same pairwise likelihood at logit ``token_scale · s_ij``. Local rows only.

Data-parallel: codes are gathered across ranks with gradient and each rank scores its own rows against the
global batch (as the contrastive loss); labels / keys are gathered as objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import string_ids
from mlmm.losses.contrastive import (at_least_fp32, check_pair, covered_pairs, gather_no_grad, gather_with_grad,
                                     paired_modalities, rank_and_world)
from mlmm.registry import LOSSES

SIMILARITIES = ("auto", "labels", "class", "identity")


@dataclass
class HashingLossConfig:
    pairs: list[list[str]] = field(default_factory=lambda: [["image", "text"]])
    codes: str = "hash"  # output prefix of the hash head ("<codes>_<modality>")
    similarity: str = "auto"  # labels | class | identity | auto
    theta_scale: float = 0.5  # Θ = theta_scale * <h_a, h_b> (DCMH: 1/2)
    pairwise_weight: float = 1.0
    intra_weight: float = 0.0  # pairwise likelihood within each modality of a pair
    quantization_weight: float = 1.0
    balance_weight: float = 0.1
    token_weight: float = 0.0  # fine-grained token alignment (needs hash head source: tokens)
    token_scale: float = 10.0
    RANGES: ClassVar[dict] = {"theta_scale": "> 0", "pairwise_weight": ">= 0", "intra_weight": ">= 0",
                              "quantization_weight": ">= 0", "balance_weight": ">= 0", "token_weight": ">= 0",
                              "token_scale": "> 0"}
    name: str = field(default="hashing", init=False)

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.pairs):
            check_pair(pair, f"{where}.pairs[{i}]")
        if not self.pairs:
            raise ConfigError(f"{where}.pairs: at least one pair is required")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"{where}.similarity: must be one of {SIMILARITIES}, got {self.similarity!r}")


# ------------------------------------------------------------------------------------ term functions
def pairwise_likelihood(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """DCMH negative log-likelihood ``mean [softplus(Θ) − S Θ]``, Θ = scale · a bᵀ. a [N, K], b [M, K], s [N, M]."""
    theta = scale * a @ b.t()  # [N, M]
    return (F.softplus(theta) - s.to(theta.dtype) * theta).mean()


def likelihood_from_logits(theta: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (F.softplus(theta) - s.to(theta.dtype) * theta).mean()


def quantization_loss(h: torch.Tensor) -> torch.Tensor:
    """``mean (sign(h) − h)²`` (sign of 0 taken as +1; no gradient through the sign)."""
    b = torch.where(h.detach() >= 0, 1.0, -1.0).to(h.dtype)
    return (b - h).pow(2).mean()


def balance_loss(h: torch.Tensor) -> torch.Tensor:
    """``mean_k (mean_i h_ik)²``: zero when every bit is balanced over the rows."""
    return h.mean(dim=0).pow(2).mean()


def token_similarity(x: torch.Tensor, xm: torch.Tensor, y: torch.Tensor, ym: torch.Tensor) -> torch.Tensor:
    """FILIP late interaction. x [N, T, d], xm Bool[N, T], y [M, U, d], ym Bool[M, U] -> [N, M] in [-1, 1]."""
    sim = torch.einsum("ntd,mud->nmtu", x, y)  # [N, M, T, U]
    neg = torch.finfo(sim.dtype).min
    pair_mask = xm[:, None, :, None] & ym[None, :, None, :]  # [N, M, T, U]
    sim = sim.masked_fill(~pair_mask, neg)
    x2y = sim.max(dim=3).values  # [N, M, T] best y-token per x-token
    y2x = sim.max(dim=2).values  # [N, M, U]
    xw = xm[:, None, :].to(sim.dtype)  # [N, 1, T]
    yw = ym[None, :, :].to(sim.dtype)  # [1, M, U]
    x2y = (x2y.clamp(min=-1) * xw).sum(-1) / xw.sum(-1).clamp(min=1)  # [N, M]
    y2x = (y2x.clamp(min=-1) * yw).sum(-1) / yw.sum(-1).clamp(min=1)  # [N, M]
    return 0.5 * (x2y + y2x)


def _gather_objects(obj: list) -> list:
    """Concatenate every rank's list (host data: keys, labels) over the host process group: no device sync."""
    rank, world = rank_and_world()
    if world == 1:
        return obj
    from mlmm.training.distributed import host_group

    out: list = [None] * world
    dist.all_gather_object(out, obj, group=host_group())
    return [x for part in out for x in part]


def similarity_matrix(labels_a: list, labels_b: list, keys_a: list[str], keys_b: list[str], mode: str,
                      device: torch.device) -> torch.Tensor:
    """S [N, M] in {0, 1}. labels_*: per-row label lists (or None); keys_*: per-row sample keys.

    Built on the host from host data and copied to `device` without waiting for it."""
    if mode == "auto":
        mode = "labels" if all(labels_a) and all(labels_b) else "identity"
    if mode == "identity":
        ia, ib = string_ids(keys_a), string_ids(keys_b)  # on the host; s moves to the device below
        s = (ia[:, None] == ib[None, :]).float()
    elif not (all(labels_a) and all(labels_b)):
        raise ValueError(f"hashing loss: similarity={mode!r} needs meta['labels'] on every row "
                         "(use similarity: identity or auto)")
    elif mode == "class":
        ids: dict[frozenset, int] = {}
        ia = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in labels_a])
        ib = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in labels_b])
        s = (ia[:, None] == ib[None, :]).float()
    else:
        vocab: dict[str, int] = {}
        for row in (*labels_a, *labels_b):
            for label in row:
                vocab.setdefault(str(label), len(vocab))
        ma, mb = torch.zeros(len(labels_a), len(vocab)), torch.zeros(len(labels_b), len(vocab))
        for mat, rows in ((ma, labels_a), (mb, labels_b)):
            for i, row in enumerate(rows):
                mat[i, [vocab[str(x)] for x in row]] = 1.0
        s = ((ma @ mb.t()) > 0).float()
    return s.to(device, non_blocking=True)


def _share(weighted_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global mean: world * sum / count (see ``local_vs_global``), 0 when count is 0."""
    return rank_and_world()[1] * weighted_sum / count.clamp(min=1)


def _mean_present(terms: list[tuple[torch.Tensor, torch.Tensor]], zero: torch.Tensor) -> torch.Tensor:
    """Mean of the terms whose flag (a device bool: the term has rows) is set; no host read."""
    if not terms:
        return zero
    values = torch.stack([t for t, _ in terms])
    flags = torch.stack([f for _, f in terms]).to(values.dtype)
    return values @ flags / flags.sum().clamp(min=1) + zero


@LOSSES.register("hashing", config=HashingLossConfig)
class HashingLoss(nn.Module):
    """``{"loss", "pairwise_loss", "quantization_loss", "balance_loss"[, "intra_loss", "token_loss"]}``."""

    @staticmethod
    def reads(cfg: HashingLossConfig, model) -> set[str]:
        hashed = paired_modalities(cfg.pairs, model.modalities)
        tokens = ("", "_tok", "_tok_mask") if cfg.token_weight > 0 else ("",)  # token_weight: the aligned tokens
        return {f"{cfg.codes}_{m}{x}" for m in hashed for x in tokens}

    def __init__(self, cfg: HashingLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.pairs = covered_pairs(cfg.pairs, modalities)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        """Every rank gathers and scores the same tensors whatever rows it holds (absent rows are weighted 0): the
        collectives and the autograd graph never depend on the data, and nothing is read back from the device."""
        cfg = self.cfg
        rank, world = rank_and_world()
        keys = list(batch.keys)
        labels = [list(m.get("labels") or []) if isinstance(m, dict) else [] for m in (batch.meta or [{}] * len(keys))]
        all_keys, all_labels = _gather_objects(keys), _gather_objects(labels)
        B = len(keys)
        hashed = sorted({m for p in self.pairs for m in p})
        codes_all, valid_all, w_mine = {}, {}, {}
        for m in hashed:
            k = f"{cfg.codes}_{m}"
            if k not in outputs:
                raise KeyError(f"hashing loss: output {k!r} missing; add a hash head for {m} "
                               f"(model.heads: {{{cfg.codes}: {{name: hash, modalities: [...]}}}})")
            h = at_least_fp32(outputs[k])  # [B, K]
            w_mine[m] = batch.mask(m).to(h.device, h.dtype)  # [B]
            codes_all[m], valid_all[m] = gather_with_grad(h), gather_no_grad(w_mine[m])  # [W*B, K], [W*B]
        zero = sum(codes_all[m].sum() * 0.0 for m in hashed)  # every gathered tensor stays in the graph
        counts = {m: valid_all[m].sum() for m in hashed}  # global rows per modality (device)
        device = zero.device
        quant, bal = [], []
        for m in hashed:  # quantisation over the global batch's present rows, balance over all of them
            h = codes_all[m][rank * B:(rank + 1) * B]  # my rows (through the gather: one graph on every rank)
            per_row = (torch.where(h.detach() >= 0, 1.0, -1.0) - h).pow(2).mean(dim=1)  # [B]
            quant.append((_share((w_mine[m] * per_row).sum(), counts[m]), counts[m] > 0))
            mean = (valid_all[m][:, None] * codes_all[m]).sum(0) / counts[m].clamp(min=1)  # [K]
            bal.append((mean.pow(2).mean(), counts[m] > 1))
        mine_labels, mine_keys = all_labels[rank * B:(rank + 1) * B], all_keys[rank * B:(rank + 1) * B]
        sim = similarity_matrix(mine_labels, all_labels, mine_keys, all_keys, cfg.similarity, device)  # [B, W*B]

        def score(a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
            """My rows of a against every row of b: this rank's share of the mean over all (a, b) pairs present."""
            theta = cfg.theta_scale * codes_all[a][rank * B:(rank + 1) * B] @ codes_all[b].t()  # [B, W*B]
            nll = F.softplus(theta) - sim * theta
            pair_w = w_mine[a][:, None] * valid_all[b][None, :]
            return _share((pair_w * nll).sum(), counts[a] * counts[b]), (counts[a] > 0) & (counts[b] > 0)

        pair_terms, intra_terms, tok_terms = [], [], []
        for a, b in self.pairs:
            pair_terms += [score(a, b), score(b, a)]  # both directions: my rows of each modality as anchors
            if cfg.intra_weight > 0:
                intra_terms += [score(a, a), score(b, b)]
            if cfg.token_weight > 0:
                tok_terms.append(self._token_term(outputs, batch, a, b, labels, keys))
        terms = {"pairwise_loss": _mean_present(pair_terms, zero), "quantization_loss": _mean_present(quant, zero),
                 "balance_loss": _mean_present(bal, zero)}
        total = (cfg.pairwise_weight * terms["pairwise_loss"] + cfg.quantization_weight * terms["quantization_loss"]
                 + cfg.balance_weight * terms["balance_loss"])
        if cfg.intra_weight > 0:
            terms["intra_loss"] = _mean_present(intra_terms, zero)
            total = total + cfg.intra_weight * terms["intra_loss"]
        if cfg.token_weight > 0:
            terms["token_loss"] = _mean_present(tok_terms, zero)
            total = total + cfg.token_weight * terms["token_loss"]
        return {"loss": total, **terms}

    def _token_term(self, outputs, batch, a: str, b: str, labels: list,
                    keys: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Local rows only (no collective): every local row is scored, absent ones weighted 0."""
        cfg = self.cfg
        ka, kb = f"{cfg.codes}_{a}_tok", f"{cfg.codes}_{b}_tok"
        if ka not in outputs or kb not in outputs:
            raise KeyError(f"hashing loss: token_weight > 0 needs {ka!r} and {kb!r}; "
                           "set the hash head's source: tokens")
        x = at_least_fp32(outputs[ka])
        va, vb = batch.mask(a).to(x.device, x.dtype), batch.mask(b).to(x.device, x.dtype)  # [B]
        s_tok = token_similarity(x, outputs[f"{ka}_mask"], outputs[kb].to(x.dtype), outputs[f"{kb}_mask"])  # [B, B]
        s = similarity_matrix(labels, labels, keys, keys, cfg.similarity, s_tok.device).to(s_tok.dtype)
        theta = cfg.token_scale * s_tok
        n = len(batch.rows(a)) * len(batch.rows(b))  # host counts: no sync
        nll = (va[:, None] * vb[None, :] * (F.softplus(theta) - s * theta)).sum() / max(n, 1)
        return nll, torch.full((), n > 0, dtype=torch.bool, device=x.device)
