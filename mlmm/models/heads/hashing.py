"""Hash heads: per-modality relaxed binary codes ``h = tanh(BN(W x))`` for cross-modal hashing.

``BN`` (``norm: batch``, default) is a BatchNorm1d over the code bits; ``norm: none`` gives DCMH's plain
``tanh(W x + b)``. Without it, codes from untrained from-scratch towers collapse to one constant code.

    model:
      heads:
        hash: {name: hash, bits: 64, modalities: [image, text]}          # DCMH / ViT2CMH style
        # FGCMH-style: codes pooled from token features that the loss also aligns word <-> patch
        hash: {name: hash, bits: 64, source: tokens}
        # CMHR-DRN style: TF-IDF + MLP text branch, CNN image branch
        hash: {name: hash, bits: 64, text_branch: tfidf, image_branch: cnn, cnn: small}

Outputs (for the losses in :mod:`mlmm.losses.hashing`): ``<output>_<m>`` Float[B, bits] relaxed codes in
(-1, 1) for every hashed modality ``m``; with ``source: tokens`` also ``<output>_<m>_tok`` Float[B, T, d]
(L2-normalised token features in the shared token space) and ``<output>_<m>_tok_mask`` Bool[B, T].
At inference the binary code is ``sign(h)`` (:meth:`HashHead.hash`; bit = ``h > 0`` when packed).

What the codes are computed from (per modality, chosen by the config):

* ``source: embedding`` (default): the model's projected, L2-normalised embedding ``outputs[m]`` [B, E].
  Codes and the float embedding then share the tower + projection, so one model serves float retrieval
  and hashing, and a contrastive term can be trained alongside (``loss: multi``).
* ``source: tokens``: the tower's token features [B, T, D_m] -> linear map to a shared token space of
  width ``token_dim`` -> attention pooling with a learned query -> hash layer (fine-grained variant; the
  token features are aligned across modalities by the ``hashing`` loss' ``token_weight`` term).
* ``text_branch: tfidf``: TF-IDF of the caption's tokenizer ids -> MLP (CMHR-DRN). Document frequencies
  are buffers (saved in exports): fitted on the training captions, either up front with
  :meth:`HashHead.fit_tfidf` or online from the training batches (summed over ranks) until fitted.
  Inverse document frequency as scikit-learn's ``smooth_idf``: ``log((1 + n) / (1 + df)) + 1``;
  ``tf`` = raw counts; rows L2-normalised. Special tokens (pad / cls / sep ...) are ignored.
* ``image_branch: cnn``: a CNN on the raw image instead of the ViT tower: ``small`` (4 conv blocks with
  GroupNorm, width ``cnn_width``) or torchvision ``resnet18`` (random init; no weight download).

With a tfidf / cnn branch the corresponding tower gets no gradient from the hashing loss; train it with a
contrastive term or leave it small (ZeRO handles parameters without gradients).
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
from mlmm.contracts import token_keys
from mlmm.registry import HEADS

SOURCES = ("embedding", "tokens")
TEXT_BRANCHES = ("tower", "tfidf")
IMAGE_BRANCHES = ("tower", "cnn")
CNNS = ("small", "resnet18")
NORMS = ("batch", "none")


@dataclass
class HashHeadConfig:
    bits: int = 64  # code length; a multiple of 8 (16 / 32 / 64 / 128 in the literature)
    modalities: list[str] = field(default_factory=lambda: ["image", "text"])
    source: str = "embedding"  # embedding | tokens (see module doc)
    hidden: int = 0  # hidden width of an MLP before the hash layer (0 = one linear layer: tanh(W x))
    norm: str = "batch"  # batch: BatchNorm1d before tanh (zero-mean, unit-scale bits; see module doc) | none
    token_dim: int = 0  # source=tokens: shared token-space width (0 = model.embed_dim)
    text_branch: str = "tower"  # tower | tfidf
    tfidf_hidden: int = 256  # hidden width of the TF-IDF MLP
    image_branch: str = "tower"  # tower | cnn
    cnn: str = "small"  # small | resnet18 (image_branch=cnn)
    cnn_width: int = 16  # channels of the first block of the small CNN (x2 per block)
    output: str = "hash"  # output key prefix: "<output>_<modality>"
    RANGES: ClassVar[dict] = {"bits": ">= 8", "hidden": ">= 0", "token_dim": ">= 0", "tfidf_hidden": ">= 0",
                              "cnn_width": ">= 1"}
    name: str = field(default="hash", init=False)

    def validate(self, where: str) -> None:
        if self.bits < 8 or self.bits % 8:
            raise ConfigError(f"{where}.bits: must be a positive multiple of 8 (codes are packed into bytes), "
                              f"got {self.bits}")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise ConfigError(f"{where}.modalities: expected a non-empty list of {MODALITIES}, got {self.modalities}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"{where}.modalities: duplicate modality in {self.modalities}")
        for key, value, allowed in (("source", self.source, SOURCES), ("text_branch", self.text_branch, TEXT_BRANCHES),
                                    ("image_branch", self.image_branch, IMAGE_BRANCHES), ("cnn", self.cnn, CNNS),
                                    ("norm", self.norm, NORMS)):
            if value not in allowed:
                raise ConfigError(f"{where}.{key}: must be one of {allowed}, got {value!r}")
        if not self.output:
            raise ConfigError(f"{where}.output: must be a non-empty key prefix")


# ------------------------------------------------------------------------------------------ branches
def hash_layer(in_dim: int, bits: int, hidden: int = 0, norm: str = "batch") -> nn.Module:
    """x [B, in_dim] -> pre-activation [B, bits] (tanh is applied by the head).

    ``norm="batch"``: ``Linear(no bias) -> BatchNorm1d``: every bit is centred and scaled over the batch,
    so the codes cannot collapse to one constant code while the towers are still untrained, and bits
    start balanced (the role of DCMH's balance term); eval mode uses the running statistics.
    """
    layers: list[nn.Module] = []
    if hidden > 0:
        layers += [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True)]
        in_dim = hidden
    if norm == "batch":
        layers += [nn.Linear(in_dim, bits, bias=False), nn.BatchNorm1d(bits)]
    else:
        layers += [nn.Linear(in_dim, bits)]
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class TfidfEncoder(nn.Module):
    """Token ids Long[B, L] + attention [B, L] -> L2-normalised TF-IDF vectors Float[B, V].

    Buffers (int64, so mixed precision never rounds them): ``df`` [V] document frequency of each token id,
    ``n_docs`` [1], ``fitted`` [1] (1 = frozen, no online update).
    """

    def __init__(self, vocab_size: int, ignore_ids: list[int]):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("df", torch.zeros(vocab_size, dtype=torch.long))
        self.register_buffer("n_docs", torch.zeros(1, dtype=torch.long))
        self.register_buffer("fitted", torch.zeros(1, dtype=torch.long))
        ignore = torch.zeros(vocab_size, dtype=torch.bool)
        ignore[[i for i in ignore_ids if 0 <= i < vocab_size]] = True
        self.register_buffer("ignore", ignore, persistent=False)

    def counts(self, ids: torch.Tensor, attention: Optional[torch.Tensor]) -> torch.Tensor:
        """Bag of token ids: Float[B, V] raw counts (special tokens and padding dropped)."""
        weight = (attention if attention is not None else torch.ones_like(ids)).float()
        bow = torch.zeros(ids.shape[0], self.vocab_size, device=ids.device).scatter_add_(1, ids.long(), weight)
        return bow.masked_fill(self.ignore, 0.0)

    @torch.no_grad()
    def update(self, bow: torch.Tensor, rows: torch.Tensor) -> None:
        """Add the documents ``bow[rows]`` to the document frequencies (summed over data-parallel ranks)."""
        present = (bow[rows] > 0).long()  # [n, V]
        delta = torch.cat([present.sum(0), torch.tensor([present.shape[0]], device=bow.device)])  # [V + 1]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(delta)
        self.df += delta[:-1]
        self.n_docs += delta[-1:]

    def idf(self) -> torch.Tensor:
        n = self.n_docs.double()
        return (torch.log((1 + n) / (1 + self.df.double())) + 1).float()  # [V]

    def forward(self, ids: torch.Tensor, attention: Optional[torch.Tensor] = None,
                present: Optional[torch.Tensor] = None) -> torch.Tensor:
        bow = self.counts(ids, attention)  # [B, V]
        if self.training and not bool(self.fitted.item()):
            rows = present if present is not None else torch.ones(bow.shape[0], dtype=torch.bool, device=bow.device)
            self.update(bow, rows.to(bow.device))
        return F.normalize(bow * self.idf().to(bow.device), dim=1)  # [B, V]


class SmallCNN(nn.Module):
    """Images [B, 3, H, W] -> [B, 8 * width]: four 3x3 conv blocks (GroupNorm, ReLU, stride 2 from the 2nd)."""

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.GroupNorm(min(8, chans[i + 1]), chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.width = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))  # global average pool: [B, 8w]


def build_cnn(kind: str, width: int) -> nn.Module:
    if kind == "small":
        return SmallCNN(width)
    from torchvision.models import resnet18

    net = resnet18(weights=None)  # random init: no download
    net.width = net.fc.in_features  # 512
    net.fc = nn.Identity()
    return net


class AttentionPool(nn.Module):
    """Tokens [B, T, d] + mask Bool[B, T] -> [B, d]: softmax attention with one learned query."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = (tokens @ self.query.to(tokens.dtype)) / math.sqrt(tokens.shape[-1])  # [B, T]
        logits = logits.masked_fill(~mask, -1e4)  # finite: rows without tokens get uniform weights (of zeros)
        w = logits.float().softmax(dim=1).to(tokens.dtype)  # [B, T]
        return self.norm((w.unsqueeze(-1) * tokens).sum(1))  # [B, d]


def _run(fn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fn(x); batch norms of a training module use their running statistics when x has a single row
    (batch statistics of one row are undefined)."""
    if x.shape[0] > 1 or not fn.training:
        return fn(x)
    norms = [mod for mod in fn.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training]
    for mod in norms:
        mod.eval()
    try:
        return fn(x)
    finally:
        for mod in norms:
            mod.train()


def _on_present_rows(fn: nn.Module, x: torch.Tensor, present: Optional[torch.Tensor]) -> torch.Tensor:
    """fn on the rows where ``present`` is True, scattered into zeros (keeps a grad path when none is)."""
    if present is None or bool(present.all()):
        return _run(fn, x)
    idx = torch.nonzero(present.to(x.device)).squeeze(1)
    if idx.numel() == 0:
        y = _run(fn, x[:1])
        return y.new_zeros((x.shape[0], *y.shape[1:])) + 0.0 * y.sum()
    y = _run(fn, x[idx])
    return y.new_zeros((x.shape[0], *y.shape[1:])).index_copy(0, idx, y)


# ---------------------------------------------------------------------------------------------- head
def branch_of(cfg: HashHeadConfig, modality: str) -> str:
    """What modality's codes are computed from: tfidf | cnn (the raw batch input) | tokens | embedding."""
    if modality == "text" and cfg.text_branch == "tfidf":
        return "tfidf"
    if modality == "image" and cfg.image_branch == "cnn":
        return "cnn"
    return "tokens" if cfg.source == "tokens" else "embedding"


@HEADS.register("hash", config=HashHeadConfig)
class HashHead(nn.Module):
    @staticmethod
    def reads(cfg: HashHeadConfig, model) -> set[str]:
        # source: tokens reads the tower's tokens, embedding its embedding; tfidf / cnn read the batch but still need
        # the tower (it embeds for the float baseline of the search)
        return {k for m in cfg.modalities for k in (token_keys(m) if branch_of(cfg, m) == "tokens" else {m})}

    @staticmethod
    def writes(cfg: HashHeadConfig, model) -> set[str]:
        out = set()
        for m in cfg.modalities:
            key = f"{cfg.output}_{m}"  # codes [B, bits]; source: tokens also the aligned token features + mask
            out |= {key, f"{key}_tok", f"{key}_tok_mask"} if branch_of(cfg, m) == "tokens" else {key}
        return out

    def __init__(self, cfg: HashHeadConfig, model):
        super().__init__()
        self.cfg = cfg
        self.bits = cfg.bits
        self.modalities = list(cfg.modalities)
        self.token_dim = cfg.token_dim or model.cfg.embed_dim
        self.branch: dict[str, str] = {}
        self.encoders = nn.ModuleDict()  # modality -> feature extractor (tfidf / cnn / token projection + pool)
        self.hash = nn.ModuleDict()  # modality -> hash layer
        for m in self.modalities:
            self.branch[m] = branch_of(cfg, m)
            if self.branch[m] == "tfidf":
                tok = model.tokenizer
                self.encoders[m] = TfidfEncoder(len(tok), list(getattr(tok, "all_special_ids", [])))
                self.hash[m] = hash_layer(len(tok), cfg.bits, cfg.tfidf_hidden, cfg.norm)
            elif self.branch[m] == "cnn":
                self.encoders[m] = build_cnn(cfg.cnn, cfg.cnn_width)
                self.hash[m] = hash_layer(self.encoders[m].width, cfg.bits, cfg.hidden, cfg.norm)
            elif self.branch[m] == "tokens":
                self.encoders[m] = nn.ModuleDict({"proj": nn.Linear(model.widths[m], self.token_dim),
                                                  "pool": AttentionPool(self.token_dim)})
                self.hash[m] = hash_layer(self.token_dim, cfg.bits, cfg.hidden, cfg.norm)
            else:
                self.hash[m] = hash_layer(model.cfg.embed_dim, cfg.bits, cfg.hidden, cfg.norm)

    def key(self, modality: str) -> str:
        return f"{self.cfg.output}_{modality}"

    def _relaxed(self, m: str, outputs: dict, raw: Optional[torch.Tensor], attention: Optional[torch.Tensor],
                 present: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Relaxed codes of modality m (and its aligned token features when source=tokens)."""
        branch, out = self.branch[m], {}
        if branch == "embedding":
            x = outputs[m]  # [B, E]
        elif branch == "tokens":
            tokens = F.normalize(self.encoders[m]["proj"](outputs[f"{m}_tokens"]), dim=-1)  # [B, T, d]
            mask = outputs[f"{m}_token_mask"]  # [B, T]
            out[f"{self.key(m)}_tok"] = tokens * mask.unsqueeze(-1)
            out[f"{self.key(m)}_tok_mask"] = mask
            x = self.encoders[m]["pool"](tokens, mask)  # [B, d]
        elif branch == "tfidf":
            x = self.encoders[m](raw, attention, present)  # [B, V]
        else:  # cnn
            x = _on_present_rows(self.encoders[m], raw, present)  # [B, C]
        # batch statistics only from the rows that carry the modality (others hold zeros)
        out[self.key(m)] = torch.tanh(_on_present_rows(self.hash[m], x, present))  # [B, bits]
        return out

    def forward(self, outputs: dict[str, torch.Tensor], batch, model) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            if m == "text":
                raw, attention = batch.text_ids, batch.text_attention
            else:
                raw, attention = getattr(batch, m), None
            read = {"embedding": m, "tokens": f"{m}_tokens"}.get(self.branch[m])
            if read is not None and read not in outputs:
                continue  # the batch has no such input at all
            if raw is None and self.branch[m] in ("tfidf", "cnn"):
                continue
            present = batch.mask(m).to(raw.device) if raw is not None else None
            result.update(self._relaxed(m, outputs, raw, attention, present))
        return result

    # ------------------------------------------------------------------ inference helpers
    def encode(self, model, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of one modality -> (relaxed codes Float[B, bits], float embedding Float[B, E]).

        ``model`` is the MultimodalModel that owns this head (heads do not keep a reference to it).
        """
        z, tokens, tmask = model.encode_tokens(modality, x, attention)
        outputs = {modality: z, f"{modality}_tokens": tokens, f"{modality}_token_mask": tmask}
        return self._relaxed(modality, outputs, x, attention, None)[self.key(modality)], z

    @torch.no_grad()
    def hash_codes(self, model, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
        """Binary codes in {-1, +1} (``sign``, 0 -> -1): Float[B, bits]."""
        h, _ = self.encode(model, modality, x, attention)
        return torch.where(h > 0, 1.0, -1.0)

    @torch.no_grad()
    def fit_tfidf(self, texts: list[str], tokenizer, max_length: int = 512) -> None:
        """Fit the TF-IDF document frequencies on a caption corpus and freeze them (no online update)."""
        if self.branch.get("text") != "tfidf":
            raise ValueError("fit_tfidf: this hash head has no tfidf text branch")
        enc: TfidfEncoder = self.encoders["text"]
        enc.df.zero_()
        enc.n_docs.zero_()
        for i in range(0, len(texts), 256):
            tok = tokenizer(list(texts[i:i + 256]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            bow = enc.counts(tok["input_ids"].to(enc.df.device), tok["attention_mask"].to(enc.df.device))
            present = (bow > 0).long()
            enc.df += present.sum(0)
            enc.n_docs += present.shape[0]
        enc.fitted.fill_(1)
