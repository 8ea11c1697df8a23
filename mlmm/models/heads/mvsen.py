"""MVSEN head ``mvsen``: multi-task visual semantic embedding (Qin et al., JCST 2024).

    model:
      heads:
        mvsen: {name: mvsen, media: image, width: 32, heads: 2, gcn_layers: 2, hard_negatives: 4}

Three things for the ``mvsen`` loss, besides the towers' global embeddings:

* **graph matching** (rows with both modalities, n of them): the pair score ``exp(a) * cos + graph`` of
  :class:`~mlmm.models.fusion.graph.GraphMatching` (intra- and inter-modality interaction, cascaded GCN over
  region / word nodes) for each query's positive (column 0) and its k hardest in-batch negatives by cosine
  (``hard_negatives: 0`` = every other row): ``mvsen_t2m_logits`` / ``mvsen_m2t_logits`` [n, 1 + k] (``-inf`` =
  invalid slot), ``mvsen_weight`` [] (0 = no such row);
* **multi-label classification**: a linear classifier shared by both modalities over ``label_scale`` times the
  L2-normalised projected embeddings,
  ``mvsen_label_logits_{media,text}`` [B, C], targets ``mvsen_label_targets_{media,text}`` [B, C] and
  ``mvsen_label_valid_{media,text}`` Bool[B]. Label vocabulary: ``labels``, or every concept of the word list.
  Media targets: the sample json ``labels`` (``label_source: meta``), or the concepts named by any of the sample's
  captions (``captions``), ``auto`` = meta when present. Text targets: the concepts the row's own caption names
  (when the word list covers its language; else the media targets);
* **text-text matching** (training): for each row with a caption, another caption of the same sample — the same
  caption index in another language (parallel captions) when there is one, else another caption of its language —
  encoded by the text tower: ``mvsen_sibling`` [S, E] (L2-normalised) for rows ``mvsen_sibling_rows`` Long[S].

At retrieval time ``head.interaction.score_pairs`` re-ranks the global top-k (``evaluate_retrieval(rerank_topk=K)``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.word_edits import DEFAULT_WORD_LIST, CaptionEditor, resolve_words
from mlmm.models.fusion.dual_interaction import candidate_pairs
from mlmm.models.fusion.graph import GraphMatching
from mlmm.models.heads.common import pair_inputs, pair_reads
from mlmm.registry import HEADS


@dataclass
class MVSENHeadConfig:
    media: str = "image"  # image (CLS token skipped) | video (frame tokens)
    width: int = 64
    heads: int = 2
    gcn_layers: int = 2
    hard_negatives: int = 4  # in-batch negatives per query scored by the graph; 0 = every other row
    labels: list[str] = field(default_factory=list)  # label vocabulary; empty = the word list's concepts
    label_source: str = "auto"  # meta | captions | auto
    label_scale: float = 10.0  # the classifier reads label_scale * the L2-normalised embedding
    text_text: bool = True  # encode a sibling caption per row for text-text matching
    word_list: str = DEFAULT_WORD_LIST
    words: dict = field(default_factory=dict)  # the loaded word lists (filled from word_list)
    chunk: int = 2048
    RANGES: ClassVar[dict] = {"width": ">= 1", "heads": ">= 1", "gcn_layers": ">= 1", "hard_negatives": ">= 0",
                              "label_scale": "> 0", "chunk": ">= 1"}
    name: str = field(default="mvsen", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")
        if self.label_source not in ("meta", "captions", "auto"):
            raise ConfigError(f"{where}.label_source: must be meta, captions or auto, got {self.label_source!r}")
        resolve_words(self, where)
        if not self.labels:
            self.labels = CaptionEditor(self.words).all_concepts()
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"{where}.labels: duplicates in {self.labels}")


def sibling_caption(meta: dict, caption: str, lang: str, rng: random.Random) -> str | None:
    """Another caption of the same sample: same index in another language if any, else another of ``lang``."""
    caps = {k: [v] if isinstance(v, str) else list(v) for k, v in (meta.get("captions") or {}).items()}
    own = caps.get(lang, [])
    idx = own.index(caption) if caption in own else -1
    parallel = [c[idx] for k, c in sorted(caps.items()) if k != lang and 0 <= idx < len(c) and c[idx].strip()]
    if parallel:
        return rng.choice(parallel)
    variants = [c for c in own if c != caption and c.strip()]
    return rng.choice(variants) if variants else None


@HEADS.register("mvsen", config=MVSENHeadConfig)
class MVSENHead(nn.Module):
    @staticmethod
    def reads(cfg: MVSENHeadConfig, model) -> set[str]:
        return pair_reads(cfg.media)

    @staticmethod
    def writes(cfg: MVSENHeadConfig, model) -> set[str]:
        return {"mvsen_t2m_logits", "mvsen_m2t_logits", "mvsen_weight", "mvsen_label_logits_media",
                "mvsen_label_logits_text", "mvsen_label_targets_media", "mvsen_label_valid_media",
                "mvsen_label_targets_text", "mvsen_label_valid_text", "mvsen_sibling", "mvsen_sibling_rows"}

    def __init__(self, cfg: MVSENHeadConfig, model):
        super().__init__()
        self.cfg, self.media = cfg, cfg.media
        self.interaction = GraphMatching(model.widths[cfg.media], model.widths["text"], cfg.width, cfg.heads,
                                         cfg.gcn_layers, skip_first=cfg.media == "image", chunk=cfg.chunk)
        self.classifier = nn.Linear(model.cfg.embed_dim, len(cfg.labels))  # shared by both modalities
        self.label_index = {c: i for i, c in enumerate(cfg.labels)}
        self.editor = CaptionEditor(cfg.words)

    # ------------------------------------------------------------------------------------ label targets
    def _multi_hot(self, concepts, device) -> tuple[torch.Tensor, bool]:
        idx = [self.label_index[c] for c in concepts if c in self.label_index]
        v = torch.zeros(len(self.cfg.labels), device=device)
        if idx:
            v[idx] = 1.0
        return v, bool(idx)

    def media_concepts(self, meta: dict) -> list[str]:
        if self.cfg.label_source in ("meta", "auto") and meta.get("labels"):
            return list(meta["labels"])
        if self.cfg.label_source == "meta":
            return []
        out = []
        for lang, caps in (meta.get("captions") or {}).items():
            for c in [caps] if isinstance(caps, str) else caps:
                out += self.editor.concepts(c, lang)
        return out

    def label_targets(self, batch, device):
        """-> (media targets [B, C], valid Bool[B], text targets [B, C], valid Bool[B])."""
        B = len(batch)
        rows_m, rows_t, ok_m, ok_t = [], [], [], []
        for i in range(B):
            meta = batch.meta[i] if batch.meta else {}
            vm, okm = self._multi_hot(self.media_concepts(meta), device)
            lang, cap = (batch.lang[i] if batch.lang else ""), (batch.captions[i] if batch.captions else "")
            own = self.editor.concepts(cap, lang) if lang in self.editor.lookup else self.media_concepts(meta)
            vt, okt = self._multi_hot(own, device)
            rows_m.append(vm), rows_t.append(vt), ok_m.append(okm), ok_t.append(okt)
        ok_m = torch.tensor(ok_m, device=device) & batch.mask(self.media).to(device)
        ok_t = torch.tensor(ok_t, device=device) & batch.mask("text").to(device)
        return torch.stack(rows_m), ok_m, torch.stack(rows_t), ok_t

    # ------------------------------------------------------------------------------------ forward
    def forward(self, outputs: dict[str, torch.Tensor], batch, model) -> dict[str, torch.Tensor]:
        m, inter = self.media, self.interaction
        device = outputs[m].device
        rows, any_valid, m_tok, m_mask, t_tok, t_mask, glob, exclude = pair_inputs(outputs, batch, m)
        n = rows.numel()
        cand = candidate_pairs(glob.t(), self.cfg.hard_negatives or n - 1, exclude)  # 0: every other row
        graph = inter.graph_pairs(m_tok, m_mask, t_tok, t_mask, cand.m_idx, cand.t_idx)  # [2 n (1+k)]
        scores = inter.combine(glob.detach()[cand.m_idx, cand.t_idx], graph)  # the global term trains via InfoNCE only
        t2m, m2t = cand.split(scores)  # [n, 1+k] each, -inf on invalid slots
        out = {"mvsen_t2m_logits": t2m, "mvsen_m2t_logits": m2t,
               "mvsen_weight": torch.tensor(float(any_valid), device=device)}
        tm, okm, tt, okt = self.label_targets(batch, device)
        s = self.cfg.label_scale
        out.update({"mvsen_label_logits_media": self.classifier(s * outputs[m]),  # [B, C]
                    "mvsen_label_logits_text": self.classifier(s * outputs["text"]),
                    "mvsen_label_targets_media": tm, "mvsen_label_valid_media": okm,
                    "mvsen_label_targets_text": tt, "mvsen_label_valid_text": okt})
        sib_rows, sib_texts = [], []
        if self.cfg.text_text and self.training:
            rng = random.Random(int(torch.randint(0, 2 ** 31 - 1, (1,))))
            text_rows = torch.nonzero(batch.mask("text")).flatten().tolist()
            for i in text_rows:
                s = sibling_caption(batch.meta[i] if batch.meta else {}, batch.captions[i], batch.lang[i], rng)
                if s is not None:
                    sib_rows.append(i), sib_texts.append(s)
        if sib_texts:
            z, _, _ = model.encode_tokens("text", *model.tokenize_text(sib_texts, device))
            out["mvsen_sibling"] = z  # [S, E]
        else:
            out["mvsen_sibling"] = outputs["text"].new_zeros((0, outputs["text"].shape[1]))
        out["mvsen_sibling_rows"] = torch.tensor(sib_rows, dtype=torch.long, device=device)
        return out
