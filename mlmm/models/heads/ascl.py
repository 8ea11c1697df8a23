"""ASCL head ``hierarchical_fusion``: asymmetry-sensitive caption edits + hierarchical (global + local) pair scores.

    model:
      heads:
        ascl: {name: hierarchical_fusion, media: image, width: 32, edits: [drop, insert, swap],
               word_list: "package:mlmm/data/wordlists/shapes.yaml"}

In training, for every row with the media and a caption the head builds one edit of the caption per configured kind
with the per-language word list (:mod:`mlmm.data.word_edits`), one asymmetry type each:

* ``drop``   — an attribute word removed: the text says *less* than the image -> a weaker positive;
* ``insert`` — an attribute of a category the caption does not name is added: the text says *more* -> a negative;
* ``swap``   — an attribute (or object, ``edit_targets``) word replaced by another of its category -> hard negative.

Concepts in the sample's ``labels`` are never inserted or swapped in (they would make a true caption). The edited
captions go through the model's own text tower + projection, and every pair is scored with
:class:`~mlmm.models.fusion.hierarchical.HierarchicalFusion`. Outputs (n = rows with both modalities, K = #edits):

* ``ascl_scores`` [n, n]: fused score of media i with caption j;
* ``ascl_edit_scores`` [n, K], ``ascl_edit_valid`` Bool[n, K], ``ascl_edit_kinds`` Long[K] (index into
  ``EDIT_KINDS``): fused score of media i with the edits of its own caption;
* ``ascl_global`` [n, n], ``ascl_edit_global`` [n, K]: the same pairs' global cosine alone;
* ``ascl_exclude`` Bool[n, n] media x caption, like ``ascl_scores``: pairs that are not negatives (same sample key,
  identical caption, media owning the caption);
* ``ascl_weight`` []: 0 when the batch has no such row (outputs then hold a zero-graph placeholder row).

At retrieval time ``head.interaction.score_pairs`` re-ranks the global top-k (``evaluate_retrieval(rerank_topk=K)``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.word_edits import DEFAULT_WORD_LIST, EDIT_KINDS, CaptionEditor, resolve_words
from mlmm.models.fusion.hierarchical import HierarchicalFusion
from mlmm.models.heads.common import pair_inputs, pair_reads
from mlmm.registry import HEADS

@dataclass
class HierarchicalFusionHeadConfig:
    media: str = "image"  # image (CLS token skipped) | video (frame tokens)
    width: int = 64  # shared space of the local (token-level) attention
    init_lambda: float = 10.0  # attention sharpness (learned)
    init_gate: float = 0.0  # u = sigmoid(gate) weighs local vs global in the pair score
    edits: list[str] = field(default_factory=lambda: ["drop", "insert", "swap"])
    edit_targets: list[str] = field(default_factory=lambda: ["attribute"])  # attribute | object
    forbid_labels: bool = True  # never insert / swap in a concept listed in the sample json "labels"
    word_list: str = DEFAULT_WORD_LIST  # YAML path or package:... path
    words: dict = field(default_factory=dict)  # the loaded word lists (filled from word_list)
    chunk: int = 4096  # pairs scored at once
    RANGES: ClassVar[dict] = {"width": ">= 1", "init_lambda": "> 0", "init_gate": "any", "chunk": ">= 1"}
    name: str = field(default="hierarchical_fusion", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        bad = [e for e in self.edits if e not in EDIT_KINDS]
        if bad or not self.edits:
            raise ConfigError(f"{where}.edits: a non-empty list of {EDIT_KINDS} (repeat a kind for several edits "
                              f"of it per caption), got {self.edits}")
        if not self.edit_targets or any(t not in ("attribute", "object") for t in self.edit_targets):
            raise ConfigError(f"{where}.edit_targets: a non-empty subset of [attribute, object], got {self.edit_targets}")
        resolve_words(self, where)


@HEADS.register("hierarchical_fusion", config=HierarchicalFusionHeadConfig)
class HierarchicalFusionHead(nn.Module):
    @staticmethod
    def reads(cfg: HierarchicalFusionHeadConfig, model) -> set[str]:
        return pair_reads(cfg.media)

    @staticmethod
    def writes(cfg: HierarchicalFusionHeadConfig, model) -> set[str]:
        return {"ascl_scores", "ascl_edit_scores", "ascl_edit_valid", "ascl_global", "ascl_edit_global",
                "ascl_edit_kinds", "ascl_exclude", "ascl_weight"}

    def __init__(self, cfg: HierarchicalFusionHeadConfig, model):
        super().__init__()
        self.cfg, self.media = cfg, cfg.media
        self.interaction = HierarchicalFusion(model.widths[cfg.media], model.widths["text"], cfg.width,
                                              skip_first=cfg.media == "image", init_lambda=cfg.init_lambda,
                                              init_gate=cfg.init_gate, chunk=cfg.chunk)
        self.editor = CaptionEditor(cfg.words)
        self.register_buffer("kinds", torch.tensor([EDIT_KINDS.index(e) for e in cfg.edits]), persistent=False)

    def make_edits(self, batch, rows: list[int]) -> list[tuple[int, int, str]]:
        """(position in rows, edit column, edited caption) for every edit that applies; seeded from torch's RNG."""
        rng = random.Random(int(torch.randint(0, 2 ** 31 - 1, (1,))))
        out = []
        for pos, r in enumerate(rows):
            caption, lang = batch.captions[r] if batch.captions else "", batch.lang[r] if batch.lang else ""
            meta = batch.meta[r] if batch.meta else {}
            forbid = set(meta.get("labels") or []) if self.cfg.forbid_labels else set()
            for col, kind in enumerate(self.cfg.edits):
                edited = self.editor.edit(caption, lang, kind, rng, targets=self.cfg.edit_targets, forbid=forbid)
                if edited is not None and edited != caption:
                    out.append((pos, col, edited))
        return out

    def forward(self, outputs: dict[str, torch.Tensor], batch, model) -> dict[str, torch.Tensor]:
        m = self.media
        z_m = outputs[m]  # [B, E]
        device = z_m.device
        rows, any_valid, m_tok, m_mask, t_tok, t_mask, glob, exclude = pair_inputs(outputs, batch, m)
        n, K = rows.numel(), len(self.cfg.edits)
        scores = self.interaction.score_matrix(m_tok, m_mask, t_tok, t_mask, glob)  # [n, n]
        edit_scores, edit_global = scores.new_zeros((n, K)), scores.new_zeros((n, K))
        edit_valid = torch.zeros((n, K), dtype=torch.bool, device=device)
        edits = self.make_edits(batch, rows.tolist()) if (self.training and any_valid) else []
        if edits:
            pos = torch.tensor([e[0] for e in edits], device=device)
            col = torch.tensor([e[1] for e in edits], device=device)
            ids, att = model.tokenize_text([e[2] for e in edits], device)  # the edited captions: [P, L]
            z_e, tok_e, mask_e = model.encode_tokens("text", ids, att)  # [P, E], [P, L, D], [P, L]
            g = (z_m[rows][pos] * z_e).sum(-1)  # [P]
            fused = self.interaction.score_pairs(m_tok, m_mask, tok_e, mask_e, pos,
                                                 torch.arange(len(edits), device=device), global_sim=g)  # [P]
            edit_scores = edit_scores.index_put((pos, col), fused)
            edit_global = edit_global.index_put((pos, col), g)
            edit_valid[pos, col] = True
        return {"ascl_scores": scores, "ascl_edit_scores": edit_scores, "ascl_edit_valid": edit_valid,
                "ascl_global": glob, "ascl_edit_global": edit_global,
                "ascl_edit_kinds": self.kinds, "ascl_exclude": exclude.t(),  # media x text
                "ascl_weight": torch.tensor(float(any_valid), device=device)}
