"""VQA head: question tokens (text tower) attend to image / video tokens through a cross-attention fusion
encoder; the pooled fused question is classified over an answer vocabulary built once from the training answers
by a data step (the standard VQAv2 setup, :mod:`mlmm.data.answers`: ``mlmm-vqa-answers --shards SHARDS --out
answers.json``); the config reads that file when it loads, and no rank scans shards to build the head.

    model.heads: {vqa: {name: vqa, media: image, width: 64, layers: 2, heads: 4, answers_from: answers.json}}

Outputs: ``vqa_logits`` [B, A], ``vqa_targets`` [B, A] (the soft VQA score every vocabulary answer would get,
:func:`mlmm.evaluation.vqa.soft_scores`, from the human answers ``meta["answers"][lang]``; zeros on rows without) and
``vqa_target_mask`` Bool[B] (row has a question, the media and at least one answer). The vocabulary is stored
in the head config (``answers``), so it lands in the export's ``config.json``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.contracts import token_keys
from mlmm.models.fusion.cross_attention import CrossAttentionFusion
from mlmm.registry import HEADS


@dataclass
class VQAHeadConfig:
    media: str = "image"  # image | video: the tokens the question attends to
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    answers: list[str] = field(default_factory=list)  # the answer vocabulary (read from answers_from if empty)
    # the vocabulary file that `mlmm-vqa-answers --shards TRAIN_SHARDS --out FILE` wrote (mlmm.data.answers)
    answers_from: str = ""
    RANGES: ClassVar[dict] = {"width": ">= 1", "layers": ">= 1", "heads": ">= 1", "mlp_ratio": "> 0"}
    name: str = field(default="vqa", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")
        if not self.answers and not self.answers_from:
            raise ConfigError(f"{where}.answers: give the answer vocabulary or answers_from (the file "
                              "mlmm-vqa-answers writes from the training shards)")
        if not self.answers:
            from mlmm.data.answers import read_answer_vocab

            try:
                self.answers = read_answer_vocab(self.answers_from)
            except ValueError as e:
                raise ConfigError(f"{where}.answers_from: {e}") from None


@HEADS.register("vqa", config=VQAHeadConfig)
class VQAHead(nn.Module):
    @staticmethod
    def reads(cfg: VQAHeadConfig, model) -> set[str]:
        return {*token_keys("text"), *token_keys(cfg.media)}

    @staticmethod
    def writes(cfg: VQAHeadConfig, model) -> set[str]:
        return {"vqa_logits", "vqa_targets", "vqa_target_mask"}

    def __init__(self, cfg: VQAHeadConfig, model):
        super().__init__()
        self.cfg = cfg
        self.answers = list(cfg.answers)
        self.index = {a: i for i, a in enumerate(self.answers)}
        self.fusion = CrossAttentionFusion(cfg.width, cfg.layers, cfg.heads, query_dim=model.widths["text"],
                                           context_dim=model.widths[cfg.media], mlp_ratio=cfg.mlp_ratio)
        self.classifier = nn.Sequential(nn.Linear(cfg.width, 2 * cfg.width), nn.GELU(), nn.LayerNorm(2 * cfg.width),
                                        nn.Linear(2 * cfg.width, len(self.answers)))

    def logits(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, media_tokens: torch.Tensor,
               media_mask: torch.Tensor) -> torch.Tensor:
        """[B, Lq, Dt], Bool[B, Lq], [B, T, Dm], Bool[B, T] -> answer logits [B, A]."""
        fused = self.fusion(text_tokens, media_tokens, query_mask=text_mask, context_mask=media_mask)  # [B, Lq, W]
        m = text_mask.to(fused.dtype).unsqueeze(-1)
        pooled = (fused * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, W]
        return self.classifier(pooled)

    def targets(self, batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        from mlmm.evaluation.vqa import soft_scores

        B = len(batch)
        t = torch.zeros(B, len(self.answers), device=device)
        has = torch.zeros(B, dtype=torch.bool, device=device)
        for i, (meta, lang) in enumerate(zip(batch.meta, batch.lang)):
            answers = (meta.get("answers") or {}).get(lang) if lang else None
            if not answers:
                continue
            for a, s in soft_scores(answers).items():
                if a in self.index and s > 0:
                    t[i, self.index[a]] = s
            has[i] = True
        return t, has

    def forward(self, outputs: dict, batch, model) -> dict:
        m = self.cfg.media
        logits = self.logits(outputs["text_tokens"], outputs["text_token_mask"], outputs[f"{m}_tokens"],
                             outputs[f"{m}_token_mask"])
        t, has = self.targets(batch, logits.device)  # rows without human answers: zero targets, masked out
        present = outputs["text_token_mask"].any(1) & outputs[f"{m}_token_mask"].any(1)
        return {"vqa_logits": logits, "vqa_targets": t, "vqa_target_mask": has & present}

    def predict(self, logits: torch.Tensor) -> list[str]:
        return [self.answers[i] for i in logits.argmax(-1).tolist()]
