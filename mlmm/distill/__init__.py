"""Distillation from a frozen teacher (CLIP / a sentence encoder): teachers, targets, precompute (the MLA language
adapters are a head: :mod:`mlmm.models.heads.language_adapter`).

Losses live in :mod:`mlmm.losses.distill` (mclip, mla, clip4vla) and :mod:`mlmm.losses.distill_kd` (logit_kd).
"""
from mlmm.distill.teacher import Teacher, TeacherConfig, build_teacher

__all__ = ["Teacher", "TeacherConfig", "build_teacher"]
