"""Per-rank random state: seeded with ``seed + rank``, saved and restored per rank as JSON (no pickle).

Every rank draws its own dropout masks, CMMAE patch masks and ASCL / MVSEN caption edits: with one seed on every
rank those would repeat across the global batch. The model itself is built before :func:`seed_rank` under the
shared seed, so every rank starts from the same weights (as open_clip seeds ``seed`` then ``seed + rank``).

A checkpoint holds ``rng/rank_<r>.json`` per rank (Python, NumPy, torch CPU and this rank's CUDA generator; the
byte states in base64), written and fsynced by the rank itself.
"""
from __future__ import annotations

import base64
import json
import logging
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

log = logging.getLogger("mlmm")
RNG_DIR = "rng"


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device's generator


def seed_rank(seed: int, rank: int) -> None:
    """The training-time random streams of `rank`: ``seed + rank`` (after the model is built with ``seed``)."""
    seed_all(seed + rank)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def state() -> dict[str, Any]:
    """This process's random state as JSON-able data."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(mt), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        out["cuda"] = _b64(torch.cuda.get_rng_state())  # the current device: the one this rank trains on
    return out


def set_state(st: dict[str, Any]) -> None:
    version, mt, gauss = st["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes(st["torch"]))
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes(st["cuda"]))


def path_for(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank:05d}.json"


def save(ckpt_dir: str | Path, rank: int) -> Path:
    """Write this rank's state into a checkpoint folder (:func:`mlmm.training.checkpoint.save` fsyncs it)."""
    path = path_for(ckpt_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state()), encoding="utf-8")
    return path


def restore(ckpt_dir: str | Path, rank: int, seed: int, step: int, legacy: Optional[dict] = None) -> str:
    """Restore this rank's state from a checkpoint; returns how (``exact`` | ``legacy`` | ``reseeded``).

    A rank the checkpoint has no file for (more ranks than wrote it) starts a fresh stream, seeded from
    ``seed + rank`` and the step, and says so. ``legacy``: the single state older checkpoints kept in DeepSpeed's
    client state.
    """
    path = path_for(ckpt_dir, rank)
    if path.is_file():
        set_state(json.loads(path.read_text(encoding="utf-8")))
        return "exact"
    if legacy is not None:  # before per-rank files: rank 0's state (DeepSpeed client state), on every rank
        random.setstate(legacy["python"])
        np.random.set_state(legacy["numpy"])
        torch.set_rng_state(legacy["torch"])
        if legacy.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(legacy["cuda"])
        return "legacy"
    seed_rank(seed + 1_000_003 * step, rank)
    log.warning("rank %d: %s has no random state for this rank (written by fewer processes): its random streams "
                "restart from a seed derived from train.seed, the rank and step %d", rank, path.parent, step)
    return "reseeded"
