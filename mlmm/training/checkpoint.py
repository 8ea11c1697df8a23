"""Training checkpoints: DeepSpeed state + ``mlmm_state.json`` (step, epoch, RNG, data position).

Layout: ``<output_dir>/checkpoints/step_00000050/`` (DeepSpeed files + mlmm_state.json) and
``<output_dir>/checkpoints/latest`` naming the newest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STATE_NAME = "mlmm_state.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: str | Path, step: int, state: dict[str, Any], keep: int = 2, is_main: bool = True) -> Path:
    """Save a checkpoint for `step`; `state` (JSON-able) goes to mlmm_state.json. Collective call."""
    root = Path(root)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"rng": rng_state(), "mlmm": state},
                           save_latest=False)
    if is_main:
        _write_atomic(root / tag / STATE_NAME, json.dumps({"step": step, **state}, indent=2))
        _write_atomic(root / "latest", tag)
        prune(root, keep)
    return root / tag


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    if keep <= 0:
        return
    latest = latest_tag(root)
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir())
    for t in tags[:-keep]:
        if t != latest:
            shutil.rmtree(root / t, ignore_errors=True)


def latest_tag(root: str | Path) -> Optional[str]:
    f = Path(root) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(root) / tag / STATE_NAME).is_file() else None


def load(engine, root: str | Path, tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Load the checkpoint `tag` (default: latest) into `engine`; returns its mlmm state or None."""
    root = Path(root)
    tag = tag or latest_tag(root)
    if tag is None:
        return None
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"{root / tag}: checkpoint not found")
    path, client = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"{root / tag}: DeepSpeed could not load this checkpoint")
    set_rng_state(client["rng"])
    state = json.loads((root / tag / STATE_NAME).read_text())
    return state
