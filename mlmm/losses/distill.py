"""Distillation from a frozen teacher (CLIP / a sentence encoder) into mlmm student towers.

Registered losses (each builds its teacher from ``loss.teacher`` and keeps it OUT of ``nn.Module``
registration, so it is never optimised, checkpointed or exported; see :mod:`mlmm.distill.teacher`):

``mclip``     M-CLIP (Carlsson et al. 2022): student text(caption in L) ~ teacher text(parallel English caption).
              ``objective: mse`` = mean squared error over rows and dims (M-CLIP's Keras "mse"); ``cosine`` =
              mean(1 - cos). Both compare L2-normalised vectors (the student's output is normalised by
              ``MultimodalModel``; retrieval uses cosine), so mse = (2 - 2 cos) / D per row.
              Rows already in the teacher's language are the English anchor (student(en) ~ teacher(en),
              Reimers & Gurevych 2020): ``anchor_weight`` is their weight against a translated row in the
              weighted mean (1 = every row alike, 0 = translations only). ``nce_weight`` > 0 adds a symmetric
              InfoNCE between student(L) and the batch's teacher targets (L -> en and en -> L).
``mla``       MLA (Zhang et al. 2022, monolingual -> multilingual). ``stage: 1`` = native-language transfer:
              MSE + symmetric InfoNCE between student text(L) and the teacher's English text embeddings of the
              batch (learnable temperature). ``stage: 2`` = language exposure: symmetric InfoNCE between the
              student text and the FROZEN teacher image embedding of the row's image; the run starts from
              stage 1's export (``train.init_from``, required unless ``allow_no_init: true``) and trains only the
              language adapters
              (``model.heads.*: {name: language_adapter}``, ``train.trainable``).
``clip4vla``  CLIP4VLA-style audio: student audio ~ teacher visual (image, or mean of video frames) with InfoNCE
              (+ optional MSE), and ~ teacher text of the sample's caption with InfoNCE.

InfoNCE terms use :func:`mlmm.losses.contrastive.masked_info_nce` (global batch across ranks, each rank scores
its own rows); rows sharing a sample key (``all_languages``) or an identical target caption are not used as
each other's negatives. Logit KD (open_clip ``DistillClipLoss``) is in :mod:`mlmm.losses.distill_kd`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch, string_ids
from mlmm.distill.targets import TeacherTargets
from mlmm.distill.teacher import TeacherConfig, build_teacher
from mlmm.losses.contrastive import masked_info_nce, temperature
from mlmm.registry import LOSSES

OBJECTIVES = ("mse", "cosine")


def regression(student: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, objective: str,
               weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over valid rows of MSE (mean over dims) or 1 - cos, weighted by ``weights`` [B] when given;
    0 (with a grad path) when no row is valid."""
    if weights is not None:
        valid = valid & (weights > 0)
    if not bool(valid.any()):
        return 0.0 * student.sum()
    s, t = student[valid], target[valid].to(student.dtype)
    if objective == "mse":
        err = (s - t).pow(2).mean(-1)  # [n]
    else:
        err = 1.0 - F.cosine_similarity(s, t, dim=-1)  # [n]
    if weights is None:
        return err.mean()
    w = weights[valid].to(err.dtype)
    return (w * err).sum() / w.sum()


class TeacherLoss(nn.Module):
    """Base: owns a frozen teacher in a plain attribute (a list, so ``nn.Module`` never registers it)."""

    def __init__(self, cfg, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self._teacher = [build_teacher(cfg.teacher)]  # plain list: not a sub-module, not in state_dict
        self.targets = TeacherTargets(self.teacher, cfg.use_stored)

    @property
    def teacher(self):
        return self._teacher[0]

    def _check_dim(self, z: torch.Tensor, modality: str) -> None:
        if z.shape[-1] != self.teacher.dim:
            raise ConfigError(f"model.embed_dim: the {modality} embedding has {z.shape[-1]} dims but the teacher's "
                              f"has {self.teacher.dim}; set model.embed_dim={self.teacher.dim}")

    def _scale(self, name: str) -> torch.Tensor:
        return temperature(self.logit_scale[name], self.cfg.max_logit_scale)

    def _make_scales(self, names: list[str]) -> None:
        # shape [1], not []: DeepSpeed's parameter broadcast cannot view 0-dim tensors as bytes
        self.logit_scale = nn.ParameterDict({n: nn.Parameter(torch.full((1,), self.cfg.init_logit_scale),
                                                             requires_grad=self.cfg.learn_temperature)
                                             for n in names})

    def temperatures(self) -> dict[str, float]:
        scales = getattr(self, "logit_scale", {})
        return {f"{k}_logit_scale": float(v.detach().exp().squeeze(0)) for k, v in scales.items()}

    @property
    def extra_inputs(self) -> dict[str, tuple[int, ...]]:
        """Media the pipeline must decode for the online teacher (read by the Trainer's generic hook)."""
        if not (self.needs_visual and self.teacher.has_image):
            return {}
        s = self.teacher.image_size
        out = {"image": (3, s, s)}
        if getattr(self.cfg, "frames", 0):
            out["video"] = (self.cfg.frames, 3, s, s)
        return out

    needs_visual = False


# --------------------------------------------------------------------------------------------- M-CLIP
@dataclass
class MClipLossConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objective: str = "mse"  # mse | cosine
    anchor_weight: float = 1.0  # weight of a row in the teacher's language (the English anchor) vs a translated row
    nce_weight: float = 0.0  # symmetric InfoNCE student(L) <-> teacher targets of the batch (0 = off)
    learn_temperature: bool = True  # InfoNCE temperature (with nce_weight > 0)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    use_stored: bool = True  # use precomputed teacher embeddings of the shards when present
    name: str = field(default="mclip", init=False)
    RANGES: ClassVar[dict] = {"anchor_weight": ">= 0", "nce_weight": ">= 0", "init_logit_scale": "any",
                              "max_logit_scale": "any"}

    def validate(self, where: str) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{where}.objective: must be one of {OBJECTIVES}, got {self.objective!r}")


@LOSSES.register("mclip", config=MClipLossConfig)
class MClipLoss(TeacherLoss):
    @staticmethod
    def reads(cfg: MClipLossConfig, model) -> set[str]:
        return {"text"}

    def __init__(self, cfg: MClipLossConfig, modalities: list[str]):
        if "text" not in modalities:
            raise ConfigError("loss.name: mclip distils into a text tower; the model has none")
        super().__init__(cfg, modalities)
        if cfg.nce_weight:
            self._make_scales(["text_teacher"])

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        s = outputs["text"]  # [B, E] L2-normalised
        self._check_dim(s, "text")
        t, valid, texts = self.targets.text(batch, s.device, s.dtype)  # [B, E], [B]
        valid &= batch.mask("text").to(s.device)
        lang_t = self.teacher.cfg.language
        anchor = torch.tensor([b < len(batch.lang) and batch.lang[b] == lang_t for b in range(len(valid))],
                              dtype=torch.bool, device=s.device)  # [B] rows in the teacher's language
        obj = self.cfg.objective
        weights = torch.where(anchor, self.cfg.anchor_weight, 1.0).to(s.dtype)  # [B]
        loss = regression(s, t, valid, obj, weights)
        terms = {f"mclip_{obj}_loss": loss, "mclip_anchor_loss": regression(s, t, valid & anchor, obj).detach(),
                 "mclip_translation_loss": regression(s, t, valid & ~anchor, obj).detach()}
        if self.cfg.nce_weight:
            nce = masked_info_nce(s, t, valid, self._scale("text_teacher"), string_ids(texts, s.device))
            terms["mclip_nce_loss"] = nce
            loss = loss + self.cfg.nce_weight * nce
        return {"loss": loss, **terms}


# ------------------------------------------------------------------------------------------------ MLA
@dataclass
class MLALossConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stage: int = 1  # 1: align text to the teacher's text tower; 2: image-text vs the frozen teacher image tower
    mse_weight: float = 1.0  # stage 1
    nce_weight: float = 1.0  # stage 1 InfoNCE vs in-batch teacher English embeddings; stage 2 image-text
    objective: str = "mse"  # stage 1 regression: mse | cosine
    use_stored: bool = True
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    allow_no_init: bool = False  # stage 2 without train.init_from: adapters on an untrained tower (explicit opt-out)
    RANGES: ClassVar[dict] = {"stage": "[1, 2]", "mse_weight": ">= 0", "nce_weight": ">= 0",
                              "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="mla", init=False)

    def validate(self, where: str) -> None:
        if self.stage not in (1, 2):
            raise ConfigError(f"{where}.stage: must be 1 or 2, got {self.stage}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{where}.objective: must be one of {OBJECTIVES}, got {self.objective!r}")

    def check_run(self, run) -> None:
        """Stage 2 trains adapters on the FROZEN stage-1 student: without ``train.init_from`` that is a random tower."""
        if self.stage == 2 and not run.train.init_from and not self.allow_no_init:
            raise ConfigError("train.init_from: MLA stage 2 trains language adapters on the frozen stage-1 student; "
                              "set train.init_from=STAGE1/export (or loss.allow_no_init: true to train them on an "
                              "untrained tower)")


@LOSSES.register("mla", config=MLALossConfig)
class MLALoss(TeacherLoss):
    @staticmethod
    def reads(cfg: MLALossConfig, model) -> set[str]:
        return {"text"}

    def __init__(self, cfg: MLALossConfig, modalities: list[str]):
        if "text" not in modalities:
            raise ConfigError("loss.name: mla distils into a text tower; the model has none")
        super().__init__(cfg, modalities)
        if cfg.stage == 2 and not self.teacher.has_image:
            raise ConfigError("loss.teacher: MLA stage 2 needs an image teacher (kind: open_clip)")
        self.needs_visual = cfg.stage == 2
        self._make_scales(["text_teacher" if cfg.stage == 1 else "text_image"])

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        s = outputs["text"]  # [B, E]
        self._check_dim(s, "text")
        has_text = batch.mask("text").to(s.device)
        if self.cfg.stage == 1:
            t, valid, texts = self.targets.text(batch, s.device, s.dtype)
            valid &= has_text
            mse = regression(s, t, valid, self.cfg.objective)
            # rows with the same English target (one sample in several languages, or identical captions)
            # are not each other's negatives
            nce = masked_info_nce(s, t, valid, self._scale("text_teacher"), string_ids(texts, s.device))
            total = self.cfg.mse_weight * mse + self.cfg.nce_weight * nce
            return {"loss": total, f"mla1_{self.cfg.objective}_loss": mse, "mla1_nce_loss": nce}
        v, valid = self.targets.visual(batch, s.device, s.dtype)
        valid &= has_text
        nce = masked_info_nce(s, v, valid, self._scale("text_image"), batch.groups(s.device))
        return {"loss": self.cfg.nce_weight * nce, "mla2_text_image_loss": nce}


# -------------------------------------------------------------------------------------- CLIP4VLA audio
@dataclass
class Clip4VLALossConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    visual_weight: float = 1.0  # InfoNCE audio <-> teacher image / frames
    mse_weight: float = 0.0  # optional MSE audio ~ teacher visual
    text_weight: float = 1.0  # InfoNCE audio <-> teacher text of the caption
    frames: int = 4  # video frames decoded for the online teacher
    use_stored: bool = True
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"visual_weight": ">= 0", "mse_weight": ">= 0", "text_weight": ">= 0", "frames": ">= 1",
                              "init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="clip4vla", init=False)


@LOSSES.register("clip4vla", config=Clip4VLALossConfig)
class Clip4VLALoss(TeacherLoss):
    needs_visual = True

    @staticmethod
    def reads(cfg: Clip4VLALossConfig, model) -> set[str]:
        return {"audio"}

    def __init__(self, cfg: Clip4VLALossConfig, modalities: list[str]):
        if "audio" not in modalities:
            raise ConfigError("loss.name: clip4vla distils into an audio tower; the model has none")
        super().__init__(cfg, modalities)
        self._make_scales(["audio_visual", "audio_text"])

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        a = outputs["audio"]  # [B, E]
        self._check_dim(a, "audio")
        has_audio = batch.mask("audio").to(a.device)
        keys = batch.groups(a.device)
        terms: dict[str, torch.Tensor] = {}
        total = 0.0 * a.sum()
        if self.cfg.visual_weight or self.cfg.mse_weight:
            v, valid_v = self.targets.visual(batch, a.device, a.dtype)
            valid_v &= has_audio
            nce_v = masked_info_nce(a, v, valid_v, self._scale("audio_visual"), keys)
            mse_v = regression(a, v, valid_v, "mse")
            terms.update(audio_visual_loss=nce_v, audio_visual_mse_loss=mse_v)
            total = total + self.cfg.visual_weight * nce_v + self.cfg.mse_weight * mse_v
        if self.cfg.text_weight:
            t, valid_t, texts = self.targets.text(batch, a.device, a.dtype)
            valid_t &= has_audio
            nce_t = masked_info_nce(a, t, valid_t, self._scale("audio_text"), string_ids(texts, a.device))
            terms["audio_text_loss"] = nce_t
            total = total + self.cfg.text_weight * nce_t
        return {"loss": total, **terms}
