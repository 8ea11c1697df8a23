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

import zlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mlmm.config import MODALITIES, ConfigError
from mlmm.losses.contrastive import covered_pairs, gather_no_grad, gather_with_grad
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
    name: str = field(default="hashing", init=False)

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2 or any(m not in MODALITIES for m in pair) or pair[0] == pair[1]:
                raise ConfigError(f"{where}.pairs[{i}]: expected two different modalities of {MODALITIES}, got {pair}")
        if not self.pairs:
            raise ConfigError(f"{where}.pairs: at least one pair is required")
        if self.similarity not in SIMILARITIES:
            raise ConfigError(f"{where}.similarity: must be one of {SIMILARITIES}, got {self.similarity!r}")
        for key in ("pairwise_weight", "intra_weight", "quantization_weight", "balance_weight", "token_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.theta_scale <= 0 or self.token_scale <= 0:
            raise ConfigError(f"{where}.theta_scale / token_scale: must be > 0")


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


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_objects(obj: list) -> list:
    rank, world = _world()
    if world == 1:
        return obj
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return [x for part in out for x in part]


def similarity_matrix(labels_a: list, labels_b: list, keys_a: list[str], keys_b: list[str], mode: str,
                      device: torch.device) -> torch.Tensor:
    """S [N, M] in {0, 1}. labels_*: per-row label lists (or None); keys_*: per-row sample keys."""
    if mode == "auto":
        mode = "labels" if all(labels_a) and all(labels_b) else "identity"
    if mode == "identity":
        ia = torch.tensor([zlib.crc32(k.encode("utf-8")) for k in keys_a], dtype=torch.long, device=device)
        ib = torch.tensor([zlib.crc32(k.encode("utf-8")) for k in keys_b], dtype=torch.long, device=device)
        return (ia[:, None] == ib[None, :]).float()
    if not (all(labels_a) and all(labels_b)):
        raise ValueError(f"hashing loss: similarity={mode!r} needs meta['labels'] on every row "
                         "(use similarity: identity or auto)")
    if mode == "class":
        ids: dict[frozenset, int] = {}
        ia = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in labels_a], device=device)
        ib = torch.tensor([ids.setdefault(frozenset(x), len(ids)) for x in labels_b], device=device)
        return (ia[:, None] == ib[None, :]).float()
    vocab: dict[str, int] = {}
    for row in (*labels_a, *labels_b):
        for label in row:
            vocab.setdefault(str(label), len(vocab))
    ma = torch.zeros(len(labels_a), len(vocab), device=device)
    mb = torch.zeros(len(labels_b), len(vocab), device=device)
    for mat, rows in ((ma, labels_a), (mb, labels_b)):
        for i, row in enumerate(rows):
            mat[i, [vocab[str(x)] for x in row]] = 1.0
    return ((ma @ mb.t()) > 0).float()


@LOSSES.register("hashing", config=HashingLossConfig)
class HashingLoss(nn.Module):
    """``{"loss", "pairwise_loss", "quantization_loss", "balance_loss"[, "intra_loss", "token_loss"]}``."""

    def __init__(self, cfg: HashingLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.pairs = covered_pairs(cfg.pairs, modalities)

    def forward(self, outputs: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rank, world = _world()
        keys = list(batch.keys)
        labels = [list(m.get("labels") or []) if isinstance(m, dict) else [] for m in (batch.meta or [{}] * len(keys))]
        all_keys, all_labels = _gather_objects(keys), _gather_objects(labels)
        B = len(keys)
        terms: dict[str, torch.Tensor] = {}
        zero = None
        pair_terms, quant_terms, bal_terms, intra_terms, tok_terms = [], [], [], [], []
        hashed = sorted({m for p in self.pairs for m in p})
        codes_local, valid_local, codes_all, valid_all = {}, {}, {}, {}
        for m in hashed:
            k = f"{cfg.codes}_{m}"
            if k not in outputs:
                raise KeyError(f"hashing loss: output {k!r} missing; add a hash head for {m} "
                               f"(model.heads: {{{cfg.codes}: {{name: hash, modalities: [...]}}}})")
            h = outputs[k]
            zero = h.sum() * 0.0 if zero is None else zero + h.sum() * 0.0
            v = batch.mask(m).to(h.device)
            codes_local[m], valid_local[m] = h, v
            codes_all[m], valid_all[m] = gather_with_grad(h), gather_no_grad(v)
        for m in hashed:  # quantisation + balance over this rank's present rows
            h, v = codes_local[m], valid_local[m]
            if bool(v.any()):
                quant_terms.append(quantization_loss(h[v]))
            va = valid_all[m]
            if int(va.sum()) > 1:
                bal_terms.append(balance_loss(codes_all[m][va]))

        mine = torch.zeros(B * world, dtype=torch.bool, device=zero.device)
        mine[rank * B:(rank + 1) * B] = True

        def score(a: str, b: str) -> Optional[torch.Tensor]:
            """My valid rows of a against every valid row of b (global batch)."""
            rows_a = torch.nonzero(mine & valid_all[a]).squeeze(1)
            rows_b = torch.nonzero(valid_all[b]).squeeze(1)
            if rows_a.numel() == 0 or rows_b.numel() == 0:
                return None
            ha, hb = codes_all[a][rows_a], codes_all[b][rows_b]
            s = similarity_matrix([all_labels[i] for i in rows_a.tolist()], [all_labels[i] for i in rows_b.tolist()],
                                  [all_keys[i] for i in rows_a.tolist()], [all_keys[i] for i in rows_b.tolist()],
                                  cfg.similarity, ha.device)
            return pairwise_likelihood(ha, hb, s, cfg.theta_scale)

        for a, b in self.pairs:
            for x, y in ((a, b), (b, a)):  # both directions: my rows of each modality as anchors
                t = score(x, y)
                if t is not None:
                    pair_terms.append(t)
            if cfg.intra_weight > 0:
                for x in (a, b):
                    t = score(x, x)
                    if t is not None:
                        intra_terms.append(t)
            if cfg.token_weight > 0:
                t = self._token_term(outputs, batch, a, b, labels, keys)
                if t is not None:
                    tok_terms.append(t)

        def mean(ts: list) -> torch.Tensor:
            return torch.stack(ts).mean() if ts else zero

        terms["pairwise_loss"] = mean(pair_terms)
        terms["quantization_loss"] = mean(quant_terms)
        terms["balance_loss"] = mean(bal_terms)
        total = (cfg.pairwise_weight * terms["pairwise_loss"] + cfg.quantization_weight * terms["quantization_loss"]
                 + cfg.balance_weight * terms["balance_loss"])
        if cfg.intra_weight > 0:
            terms["intra_loss"] = mean(intra_terms)
            total = total + cfg.intra_weight * terms["intra_loss"]
        if cfg.token_weight > 0:
            terms["token_loss"] = mean(tok_terms)
            total = total + cfg.token_weight * terms["token_loss"]
        return {"loss": total, **terms}

    def _token_term(self, outputs, batch, a: str, b: str, labels: list, keys: list) -> Optional[torch.Tensor]:
        cfg = self.cfg
        ka, kb = f"{cfg.codes}_{a}_tok", f"{cfg.codes}_{b}_tok"
        if ka not in outputs or kb not in outputs:
            raise KeyError(f"hashing loss: token_weight > 0 needs {ka!r} and {kb!r}; set the hash head's source: tokens")
        va, vb = batch.mask(a).to(outputs[ka].device), batch.mask(b).to(outputs[kb].device)
        if not bool(va.any()) or not bool(vb.any()):
            return None
        ia, ib = torch.nonzero(va).squeeze(1), torch.nonzero(vb).squeeze(1)
        s_tok = token_similarity(outputs[ka][ia], outputs[f"{ka}_mask"][ia], outputs[kb][ib], outputs[f"{kb}_mask"][ib])
        s = similarity_matrix([labels[i] for i in ia.tolist()], [labels[i] for i in ib.tolist()],
                              [keys[i] for i in ia.tolist()], [keys[i] for i in ib.tolist()], cfg.similarity,
                              s_tok.device)
        return likelihood_from_logits(cfg.token_scale * s_tok, s)
