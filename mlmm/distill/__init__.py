"""Distillation from a frozen teacher (CLIP / a sentence encoder): teachers, targets, precompute, adapters.

Losses live in :mod:`mlmm.losses.distill` (mclip, mla, clip4vla) and :mod:`mlmm.losses.distill_kd` (logit_kd).
"""
from mlmm.distill.teacher import Teacher, TeacherConfig, build_teacher

__all__ = ["Teacher", "TeacherConfig", "build_teacher"]
