"""Generic fine-tuning hooks of the Trainer: initialise from an export, freeze by regex, extra loss inputs.

    load_init(model, "runs/stage1/export", trainable=["model\\.heads\\..*"])   # train.init_from
    load_init(model, "ViT-B-32.safetensors")                                    # or an open_clip checkpoint
    freeze_except(train_module, ["model\\.heads\\..*", "loss\\..*"])           # train.trainable
    loss_extra_inputs(loss)   # media a loss reads without a student tower (a frozen teacher's images)
    loss_teachers(loss)       # identities of the loss's frozen teachers (recorded in exports)

None of these know about any method: MLA stage 2 is "init from stage 1's export + train only the adapters".
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from mlmm.sources import is_hub_id

log = logging.getLogger("mlmm")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def load_init(model: nn.Module, export_dir: str | Path, trainable: Optional[Sequence[str]] = None) -> list[str]:
    """Load ``export_dir/model.safetensors`` into ``model`` (before DeepSpeed init); returns new (missing) keys.

    Strict, with one exception: every key of the export must exist in the model with the same shape, and a
    model key absent from the export is allowed only if ``trainable`` selects it (as ``model.<key>``), i.e. a
    module added for fine-tuning (adapters, heads). Anything else raises ``ValueError`` naming the keys.

    ``export_dir`` may be a Hub id of an mlmm export. An open_clip checkpoint (a weights file, ``local-dir:DIR``,
    an open_clip folder, ``hf-hub:org/name[@rev]`` or ``ARCH:TAG``, the last two through the caches) initialises
    the image / text towers it has (:func:`mlmm.hub.interop_open_clip.load_open_clip_into`, strict per tower); the other
    towers keep their own initialisation (e.g. ``model.text.pretrained``), whatever ``trainable`` says.
    """
    from mlmm.hub import WEIGHTS_NAME, is_open_clip_source, load_open_clip_into, load_state_dict, resolve_pretrained
    from mlmm.hub.pretrained import open_clip_weights

    by_name = open_clip_weights(str(export_dir), "train.init_from")  # hf-hub:org/name, ARCH:TAG (the caches)
    if by_name is not None:
        return load_open_clip_into(model, by_name[0], model_cfg=by_name[1])
    if is_open_clip_source(export_dir):
        return load_open_clip_into(model, export_dir)
    path = Path(export_dir)
    if is_hub_id(export_dir):  # an mlmm export on the Hub (offline: from the HF cache)
        path = resolve_pretrained(str(export_dir))
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"train.init_from: {path} is not an mlmm export (no {WEIGHTS_NAME})")
    saved = load_state_dict(path / WEIGHTS_NAME)
    own = model.state_dict()
    unexpected = sorted(k for k in saved if k not in own)
    shapes = sorted(k for k in saved if k in own and tuple(saved[k].shape) != tuple(own[k].shape))
    missing = sorted(k for k in own if k not in saved)
    not_new = [k for k in missing if not _matches(f"model.{k}", trainable or [])]
    if unexpected or shapes or not_new:
        raise ValueError(f"train.init_from: {path / WEIGHTS_NAME} does not fit the model: unexpected keys "
                         f"{unexpected[:5]}, shape mismatches {shapes[:5]}, missing keys not selected by "
                         f"train.trainable {not_new[:5]}")
    model.load_state_dict(saved, strict=False)
    log.info("initialised from %s (%d tensors; new: %s)", path, len(saved), missing[:8])
    return missing


def freeze_except(module: nn.Module, patterns: Sequence[str]) -> tuple[int, int]:
    """``requires_grad = re.fullmatch(any pattern, name)`` for every parameter; returns (trainable, total).

    Every pattern must match at least one parameter (a typo would otherwise freeze everything silently).
    """
    names = [n for n, _ in module.named_parameters()]
    for i, p in enumerate(patterns):
        if not any(re.fullmatch(p, n) for n in names):
            raise ValueError(f"train.trainable[{i}]: {p!r} matches no parameter (names look like {names[:3]})")
    n_train = total = 0
    for name, param in module.named_parameters():
        param.requires_grad_(_matches(name, patterns))
        total += param.numel()
        n_train += param.numel() if param.requires_grad else 0
    if n_train == 0:
        raise ValueError(f"train.trainable: {list(patterns)} leaves no parameter trainable")
    return n_train, total


def loss_extra_inputs(loss: nn.Module) -> dict[str, tuple[int, ...]]:
    """Union of ``extra_inputs`` ({modality: per-sample shape}) declared by the loss and its sub-modules."""
    out: dict[str, tuple[int, ...]] = {}
    for mod in loss.modules():
        for m, shape in (getattr(mod, "extra_inputs", None) or {}).items():
            if m in out and tuple(out[m]) != tuple(shape):
                raise ValueError(f"loss terms ask for {m} at two shapes: {out[m]} and {shape}")
            out[m] = tuple(shape)
    return out


def loss_teachers(loss: nn.Module) -> list[dict]:
    """Identities of the distillation teachers held by the loss and its sub-modules (``teacher`` attributes), once
    each (several terms may share one teacher); recorded in exports. Hashes their weights: call at export."""
    seen, out = set(), []
    for mod in loss.modules():
        teacher = getattr(mod, "teacher", None)
        if teacher is not None and hasattr(teacher, "identity") and id(teacher) not in seen:
            seen.add(id(teacher))
            out.append(teacher.identity())
    return out
