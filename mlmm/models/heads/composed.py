"""Composed image retrieval head: reference image + modification text -> query embedding (TIRG / CLIP4Cir style).

    model:
      heads:
        composed: {name: composed, width: 64, heads: 2, layers: 1, dim_width: 64, dim_sources: [reference, text]}
    data:
      text_field: modification          # the batch text is the modification; batch.image is the target

For each row that has a target image, a modification text and a reference image (``Batch.extras["ref"]``,
stored as ``ref.jpg`` in the shard sample):

1. the reference goes through the model's own image tower + projection (Siamese with the target):
   ``r`` [n, E] (L2-normalised) and patch tokens [n, P, D_img];
2. **local fusion**: the modification's word tokens cross-attend to the reference patches
   (:class:`~mlmm.models.fusion.cross_attention.CrossAttentionFusion`, ``layers`` layers; 0 = off), masked mean
   -> [n, W];
3. **fused global** ``f = MLP([W_r r; W_t t; local])`` [n, W] (t = the text embedding);
4. **gated residual composition** (TIRG): ``q = normalise(sigmoid(G f) * r + R f)`` [n, E] — the gate keeps
   what the text leaves unchanged in the reference, the residual adds what it changes.

Deep InfoMax inputs for the ``composed`` loss: ``composed_dim_global`` = a projection of ``f`` and, per source in
``dim_sources``, the projected local features (encode-and-dot critic; DIM's encoders are MLPs with a linear
shortcut): ``reference`` = reference patches, ``text`` = modification words, ``target`` = target patches.

Outputs (all [B, ...], zeros where a row has no triplet): ``composed_query`` [B, E], ``composed_valid`` Bool[B],
``composed_dim_global`` [B, D], ``composed_dim_<source>`` [B, T, D], ``composed_dim_<source>_mask`` Bool[B, T].
At evaluation :meth:`ComposedHead.encode_query` builds queries from raw reference images and token ids
(:mod:`mlmm.evaluation.composed`).

The reference is encoded by the model's own image tower and projection (``MultimodalModel.encode_tokens``, the model
being passed to ``forward``), called inside the head's forward, so ZeRO stage 3 is not supported: use
``train.zero_stage`` <= 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.contracts import token_keys
from mlmm.models.fusion.cross_attention import CrossAttentionFusion
from mlmm.registry import HEADS

SOURCES = ("reference", "text", "target")


@dataclass
class ComposedHeadConfig:
    width: int = 64  # fusion width W
    heads: int = 2
    layers: int = 1  # cross-attention layers words -> reference patches (0 = global composition only)
    dim_width: int = 64  # Deep InfoMax critic embedding D
    dim_sources: list[str] = field(default_factory=lambda: ["reference", "text"])
    reference: str = "ref"  # Batch.extras name of the reference image
    RANGES: ClassVar[dict] = {"width": ">= 1", "heads": ">= 1", "layers": ">= 0", "dim_width": ">= 1"}
    name: str = field(default="composed", init=False)

    def validate(self, where: str) -> None:
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")
        bad = [s for s in self.dim_sources if s not in SOURCES]
        if bad:
            raise ConfigError(f"{where}.dim_sources: {bad} not in {SOURCES}")


class LocalEncoder(nn.Module):
    """DIM's local/global encoder: ``MLP(x) + Linear(x)`` -> [..., D]."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, d_out))
        self.shortcut = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.shortcut(x)


@HEADS.register("composed", config=ComposedHeadConfig)
class ComposedHead(nn.Module):
    @staticmethod
    def reads(cfg: ComposedHeadConfig, model) -> set[str]:
        target = token_keys("image") if "target" in cfg.dim_sources else set()
        return {"image", "text", *token_keys("text"), *target}

    @staticmethod
    def writes(cfg: ComposedHeadConfig, model) -> set[str]:
        return {"composed_query", "composed_dim_global", "composed_valid",
                *(f"composed_dim_{s}{x}" for s in cfg.dim_sources for x in ("", "_mask"))}

    def __init__(self, cfg: ComposedHeadConfig, model):
        super().__init__()
        self.cfg = cfg
        self.image_size = model.cfg.image.image_size
        E, W, D = model.cfg.embed_dim, cfg.width, cfg.dim_width
        d_img, d_txt = model.widths["image"], model.widths["text"]
        self.ref_in, self.text_in = nn.Linear(E, W), nn.Linear(E, W)
        self.local = CrossAttentionFusion(W, cfg.layers, cfg.heads, query_dim=d_txt, context_dim=d_img) \
            if cfg.layers > 0 else None
        self.fuse = nn.Sequential(nn.LayerNorm((3 if self.local is not None else 2) * W),
                                  nn.Linear((3 if self.local is not None else 2) * W, W), nn.GELU(), nn.Linear(W, W))
        self.gate, self.residual = nn.Linear(W, E), nn.Linear(W, E)
        self.dim_global = LocalEncoder(W, D)
        widths = {"reference": d_img, "text": d_txt, "target": d_img}
        self.dim_local = nn.ModuleDict({s: LocalEncoder(widths[s], D) for s in cfg.dim_sources})

    def compose(self, ref_z: torch.Tensor, ref_tokens: torch.Tensor, text_z: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ref_z [n, E], ref_tokens [n, 1+P, D_img] (CLS first), text_z [n, E], text_tokens [n, L, D_txt],
        text_mask Bool[n, L] -> (query [n, E] L2-normalised, fused global [n, W])."""
        parts = [self.ref_in(ref_z), self.text_in(text_z)]  # 2 x [n, W]
        if self.local is not None:
            x = self.local(text_tokens, ref_tokens[:, 1:], query_mask=text_mask)  # [n, L, W]
            m = text_mask.to(x.dtype).unsqueeze(-1)  # [n, L, 1]
            parts.append((x * m).sum(1) / m.sum(1).clamp_min(1))  # [n, W]
        fused = self.fuse(torch.cat(parts, dim=-1))  # [n, W]
        query = torch.sigmoid(self.gate(fused)) * ref_z + self.residual(fused)  # [n, E]
        return F.normalize(query, dim=-1), fused

    @torch.no_grad()
    def encode_query(self, model, ref_images: torch.Tensor, text_ids: torch.Tensor, text_attention: torch.Tensor
                     ) -> torch.Tensor:
        """Raw inputs -> composed query [n, E]: ref_images [n, 3, S, S], text ids / attention [n, L]; ``model`` is
        the MultimodalModel that owns this head."""
        ref_z, ref_tokens, _ = model.encode_tokens("image", ref_images)
        text_z, text_tokens, _ = model.encode_tokens("text", text_ids, text_attention)
        return self.compose(ref_z, ref_tokens, text_z, text_tokens, text_attention.bool())[0]

    # ----------------------------------------------------------------------------- training forward
    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch, model) -> dict[str, torch.Tensor]:
        device, B = outputs["text"].device, len(batch)
        ref_all = batch.extras.get(self.cfg.reference)
        ref_mask = batch.extras.get(f"{self.cfg.reference}_mask", torch.zeros(B, dtype=torch.bool)).to(device)
        valid = batch.mask("image").to(device) & batch.mask("text").to(device) & ref_mask  # [B]
        rows = torch.nonzero(valid).squeeze(1)  # [n]
        placeholder = rows.numel() == 0  # run on one zero row so every parameter keeps a (zero) gradient
        dtype = outputs["text"].dtype
        if placeholder:
            rows = torch.zeros(1, dtype=torch.long, device=device)
            ref = torch.zeros(1, 3, self.image_size, self.image_size, device=device, dtype=dtype)
        else:
            ref = ref_all.to(device, dtype)[rows]  # [n, 3, S, S]
        ref_z, ref_tokens, _ = model.encode_tokens("image", ref)  # [n, E], [n, 1+P, D_img]
        text_tokens, text_mask = outputs["text_tokens"][rows], outputs["text_token_mask"][rows]  # [n, L, D], [n, L]
        query, fused = self.compose(ref_z, ref_tokens, outputs["text"][rows], text_tokens, text_mask)
        local = {"reference": (ref_tokens[:, 1:], torch.ones(ref_tokens.shape[0], ref_tokens.shape[1] - 1,
                                                              dtype=torch.bool, device=device)),
                 "text": (text_tokens, text_mask)}
        if "target" in self.dim_local:
            local["target"] = (outputs["image_tokens"][rows][:, 1:], outputs["image_token_mask"][rows][:, 1:])
        results = {"composed_query": query, "composed_dim_global": self.dim_global(fused)}
        for s in self.dim_local:
            results[f"composed_dim_{s}"] = self.dim_local[s](local[s][0])
            results[f"composed_dim_{s}_mask"] = local[s][1]
        out = {"composed_valid": valid}
        for k, v in results.items():  # scatter the n rows into [B, ...] (zeros / False elsewhere)
            full = v.new_zeros((B, *v.shape[1:]))
            if placeholder:
                out[k] = full + v.sum() * 0 if v.is_floating_point() else full
            else:
                out[k] = full.index_copy(0, rows, v)
        return out
