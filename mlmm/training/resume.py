"""Which checkpoint a run resumes, decided before anything is built, loaded or written (rank 0 decides).

:func:`plan` walks ``<output_dir>/checkpoints`` from ``latest`` back: a damaged checkpoint (see
:mod:`mlmm.training.fingerprint`) is moved aside to ``damaged_step_N`` and the previous complete one is used, with a
note naming what was wrong; a folder mlmm did not write is refused unless ``train.trust_checkpoint``; when checkpoints
exist and none can be resumed the run is refused rather than started over. The chosen checkpoint's run record is then
compared with this run's (:mod:`mlmm.training.run_identity`): keys that define the run refuse (``train.resume=force``
overrides and logs them), legitimate edits are returned to be logged and applied.

``train.resume``: ``auto`` (the newest sound checkpoint, if any) | ``force`` (the same, accepting a changed run) |
``never`` (start a new run; refused if the folder holds checkpoints of an earlier one) | ``step_N`` (exactly that one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlmm.config import RunConfig
from mlmm.training import checkpoint, fingerprint, run_identity
from mlmm.training.errors import CheckpointRefused, ResumeMismatch

_TAG = re.compile(r"step_(\d+)")


@dataclass
class ResumePlan:
    tag: Optional[str] = None  # the checkpoint to load; None = a new run
    state: Optional[dict[str, Any]] = None  # its mlmm_state.json
    notes: list[str] = field(default_factory=list)  # warnings to log once train.log is open
    edits: list[str] = field(default_factory=list)  # "key: old -> new" changes applied by the resumed run


def list_tags(root: Path) -> list[str]:
    """Checkpoint folders ``step_N`` under `root`, oldest first."""
    found = [p.name for p in root.glob("step_*") if p.is_dir() and _TAG.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda t: int(t[5:]))


def _untrusted(folder: Path, why: Exception) -> CheckpointRefused:
    return CheckpointRefused(
        f"{folder}: {why}. Resuming unpickles these files (DeepSpeed loads checkpoints with "
        f"torch.load(weights_only=False)); set train.trust_checkpoint=true only if you trust where they came from")


def _select(root: Path, trust: bool) -> Optional[tuple[str, dict, list[str], list[tuple[str, str]]]]:
    """(tag, state, notes, damaged newer checkpoints with what is wrong) of the newest sound checkpoint, or None
    when the folder has none at all. Reads only."""
    tags, notes = list_tags(root), []
    latest_file = root / "latest"
    latest = latest_file.read_text(errors="replace").strip() if latest_file.is_file() else None
    if latest is not None and latest in tags:
        order = tags[:tags.index(latest) + 1][::-1]
    else:
        order = tags[::-1]
        if latest is not None:
            notes.append(f"{latest_file} names {latest[:40]!r}, which is not a checkpoint folder here")
        elif tags:
            notes.append(f"{latest_file} is missing: trying the newest checkpoint folder")
    damaged: list[tuple[str, str]] = []
    for tag in order:
        try:
            state = fingerprint.check(root / tag, trust=trust)
        except fingerprint.Damaged as e:
            damaged.append((tag, str(e)))
            continue
        except fingerprint.Untrusted as e:
            raise _untrusted(root / tag, e) from None
        return tag, state, notes, damaged
    if order or latest is not None:
        why = "; ".join(f"{t}: {w}" for t, w in damaged) or f"latest names {latest!r}, which does not exist"
        raise CheckpointRefused(f"no checkpoint in {root} can be resumed ({why}). Nothing was changed; to start a new "
                                f"run, move {root} away or use another output_dir")
    return None


def plan(cfg: RunConfig, root: Path, record: dict[str, Any], world: int) -> ResumePlan:
    """Decide what this run resumes (reads JSON only; may move damaged checkpoints aside). Raises
    :class:`CheckpointRefused` / :class:`ResumeMismatch` with a one-line message naming the culprit."""
    mode, trust = cfg.train.resume, cfg.train.trust_checkpoint
    if mode == "never":
        tags = list_tags(root)
        if tags:
            raise CheckpointRefused(f"train.resume=never, but {root} holds checkpoints of an earlier run (newest "
                                    f"{tags[-1]}): a new run there would mix two runs; use another output_dir, or "
                                    f"train.resume=auto to continue that one")
        return ResumePlan()
    if mode in ("auto", "force"):
        chosen = _select(root, trust)
        if chosen is None:
            return ResumePlan()
        tag, state, notes, damaged = chosen
    else:
        tag, notes, damaged = mode, [], []
        if not (root / tag).is_dir():
            raise CheckpointRefused(f"train.resume={tag}: {root / tag} does not exist (checkpoints: "
                                    f"{', '.join(list_tags(root)) or 'none'})")
        try:
            state = fingerprint.check(root / tag, trust=trust)
        except fingerprint.Damaged as e:
            raise CheckpointRefused(f"train.resume={tag}: {root / tag} is damaged: {e}") from None
        except fingerprint.Untrusted as e:
            raise _untrusted(root / tag, e) from None
    run = state.get("run")
    if isinstance(run, dict) and isinstance(run.get("config"), dict):
        refused, edits = run_identity.compare(
            run, record, cfg, saved_world=int(state.get("world_size", world)), world=world,
            resplit_possible=record["shards"]["samples"] is not None)
    else:
        refused, edits = ["no run config recorded (written by an mlmm older than this check)"], []
    if refused:
        if mode != "force":
            raise ResumeMismatch(
                f"{root / tag} belongs to another run: {'; '.join(refused)}. These keys define the run: revert them, "
                f"use another output_dir, or set train.resume=force to resume anyway")
        notes.append(f"train.resume=force: resuming {root / tag} although it belongs to another run: "
                     f"{'; '.join(refused)}")
    if mode in ("auto", "force"):
        notes += _set_aside(root, damaged, tag)  # only now that the run goes ahead
    return ResumePlan(tag=tag, state=state, notes=notes, edits=edits)


def _set_aside(root: Path, damaged: list[tuple[str, str]], tag: str) -> list[str]:
    """Move damaged checkpoints newer than `tag` to ``damaged_step_N`` (kept for inspection, out of the way of the
    next saves) and point ``latest`` at `tag`. -> a note per checkpoint moved."""
    notes = []
    for bad, why in damaged:
        aside = root / f"damaged_{bad}"
        n = 1
        while aside.exists():
            n += 1
            aside = root / f"damaged_{bad}_{n}"
        (root / bad).rename(aside)
        notes.append(f"checkpoint {root / bad} is damaged ({why}): moved to {aside.name}; resuming from the previous "
                     f"complete checkpoint {tag}")
    latest = root / "latest"
    if not latest.is_file() or latest.read_text(errors="replace").strip() != tag:
        checkpoint._write_atomic(latest, tag)
    return notes
