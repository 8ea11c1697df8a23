"""Logit distillation (open_clip ``DistillClipLoss``): the student's similarity logits match the teacher's.

For a pair (a, b) of embeddings per row, with student logits ``S = s * A_s @ B_s^T`` (learnable student
scale s) and teacher logits ``T = s_t * A_t @ B_t^T`` (the teacher's own logit scale)::

    kd(T, S) = -mean_i sum_j softmax(T)_ij log_softmax(S)_ij
    loss     = (kd(T, S) + kd(T^T, S^T)) / 2

exactly open_clip's ``DistillClipLoss.dist_loss`` averaged over the image->text and text->image directions
(tested against it). Each side of ``student`` names a student output (``image``, ``text``, ``audio``, ...)
or a frozen teacher embedding (``teacher_image``, ``teacher_video``, ``teacher_text``: a text-only student
can match the teacher's text->image distribution against the teacher image tower). ``teacher`` names the
teacher embeddings (``image``, ``video``, ``text``) that give the target logits. Rows are those where all
four embeddings exist; over ranks the batch is gathered (student with gradient) and each rank scores its
own rows. Combine with other terms via ``loss: {name: multi, terms: {...}}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.distill.teacher import TeacherConfig
from mlmm.losses.contrastive import at_least_fp32, gather_no_grad, gather_with_grad, local_vs_global
from mlmm.losses.distill import TeacherLoss
from mlmm.registry import LOSSES

TEACHER_SIDES = ("image", "video", "text")


@dataclass
class LogitKDLossConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: list[str] = field(default_factory=lambda: ["image", "text"])
    teacher_pair: list[str] = field(default_factory=lambda: ["image", "text"])
    use_stored: bool = True
    learn_temperature: bool = True
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    RANGES: ClassVar[dict] = {"init_logit_scale": "any", "max_logit_scale": "any"}
    name: str = field(default="logit_kd", init=False)

    def validate(self, where: str) -> None:
        if len(self.student) != 2 or len(self.teacher_pair) != 2:
            raise ConfigError(f"{where}.student / teacher_pair: two names each, "
                              f"got {self.student} / {self.teacher_pair}")
        for i, t in enumerate(self.teacher_pair):
            if t not in TEACHER_SIDES:
                raise ConfigError(f"{where}.teacher_pair[{i}]: must be one of {TEACHER_SIDES}, got {t!r}")


def kd_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """open_clip ``DistillClipLoss.dist_loss``: -mean_i sum_j softmax(T)_ij log_softmax(S)_ij."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


@LOSSES.register("logit_kd", config=LogitKDLossConfig)
class LogitKDLoss(TeacherLoss):
    @staticmethod
    def reads(cfg: LogitKDLossConfig, model) -> set[str]:
        return {s for s in cfg.student if not s.startswith("teacher_")}  # the student towers' embeddings

    def __init__(self, cfg: LogitKDLossConfig, modalities: list[str]):
        super().__init__(cfg, modalities)
        for i, side in enumerate(cfg.student):
            if not side.startswith("teacher_") and side not in modalities:
                raise ConfigError(f"loss.student[{i}]: {side!r} is not a tower of the model {modalities}")
            if side.startswith("teacher_") and side[len("teacher_"):] not in TEACHER_SIDES:
                raise ConfigError(f"loss.student[{i}]: {side!r}: teacher sides are teacher_image|video|text")
        sides = set(cfg.teacher_pair) | {s[len("teacher_"):] for s in cfg.student if s.startswith("teacher_")}
        if sides & {"image", "video"} and not self.teacher.has_image:
            raise ConfigError(f"loss.teacher: {sorted(sides)} need an image teacher (kind: open_clip)")
        self.needs_visual = bool(sides & {"image", "video"})
        self._make_scales(["student"])

    def _teacher_side(self, side: str, batch: Batch, device, dtype, cache: dict):
        if side not in cache:
            if side == "text":
                z, valid, _ = self.targets.text(batch, device, dtype)
            else:  # image / video: the row's visual embedding (image first, else frames)
                z, valid = self.targets.visual(batch, device, dtype)
                valid = valid & batch.mask(side).to(device)
            cache[side] = (z, valid)
        return cache[side]

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        ref = next(outputs[s] for s in self.cfg.student if not s.startswith("teacher_"))
        device, dtype, cache = ref.device, ref.dtype, {}
        valid = torch.ones(len(batch), dtype=torch.bool, device=device)
        student = []
        for side in self.cfg.student:
            if side.startswith("teacher_"):
                z, ok = self._teacher_side(side[len("teacher_"):], batch, device, dtype, cache)
            else:
                self._check_dim(outputs[side], side)
                z, ok = outputs[side], batch.mask(side).to(device)
            student.append(z)
            valid &= ok
        teacher = []
        for side in self.cfg.teacher_pair:
            z, ok = self._teacher_side(side, batch, device, dtype, cache)
            teacher.append(z)
            valid &= ok
        teacher_scale = torch.tensor(self.teacher.logit_scale, dtype=torch.float32).to(device, non_blocking=True)
        loss = distill_clip_loss(student[0], student[1], self._scale("student"), teacher[0], teacher[1], teacher_scale,
                                 valid)
        return {"loss": loss, "logit_kd_loss": loss}


def distill_clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, ta: torch.Tensor, tb: torch.Tensor,
                      teacher_scale: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KD over the global batch's valid rows; this rank's rows are the queries. All inputs [B, D] / [B].

    Returns this rank's share of the global mean (:func:`~mlmm.losses.contrastive.local_vs_global`), in fp32."""
    a_all, b_all = at_least_fp32(gather_with_grad(a)), at_least_fp32(gather_with_grad(b))  # [W*B, D]
    ta_all, tb_all = gather_no_grad(ta).to(a_all.dtype), gather_no_grad(tb).to(a_all.dtype)
    rows, allowed, weight, norm = local_vs_global(valid, dtype=a_all.dtype)
    scale, teacher_scale = scale.to(a_all.dtype), teacher_scale.to(a_all.dtype)

    def kd(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:  # [B, W*B] each -> [B]
        p_t = t_logits.masked_fill(~allowed, float("-inf")).softmax(dim=1)
        logp_s = s_logits.masked_fill(~allowed, float("-inf")).log_softmax(dim=1).masked_fill(~allowed, 0.0)
        return -(p_t * logp_s).sum(dim=1)

    s_ab, s_ba = scale * a_all[rows] @ b_all.t(), scale * b_all[rows] @ a_all.t()  # [B, W*B]
    t_ab, t_ba = teacher_scale * ta_all[rows] @ tb_all.t(), teacher_scale * tb_all[rows] @ ta_all.t()
    return norm * (weight * 0.5 * (kd(t_ab, s_ab) + kd(t_ba, s_ba))).sum()
