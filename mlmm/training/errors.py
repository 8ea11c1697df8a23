"""Refusals: the state of ``output_dir`` forbids starting this run (``recipes/train.py`` prints one line, exits 3).

Each message names the culprit (a lock holder, a checkpoint folder and what is wrong with it, the config keys
that changed) and how to proceed. They are raised on every rank alike (:func:`mlmm.training.distributed.main_decides`).
"""
from __future__ import annotations


class RunRefused(RuntimeError):
    """The output folder refuses this run; nothing in it was changed."""


class OutputDirInUse(RunRefused):
    """Another run holds ``<output_dir>/run.lock`` (or may hold it: a lock written on another host)."""


class CheckpointRefused(RunRefused):
    """No checkpoint can be resumed safely: damaged, not written by mlmm (see ``train.trust_checkpoint``), or absent
    where one was asked for."""


class ResumeMismatch(RunRefused):
    """The checkpoint was written by a run config that differs in keys that define the run (``train.resume=force``
    overrides)."""
