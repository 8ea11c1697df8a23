"""The mlmm export folder: ``config.json`` + ``model.safetensors`` + tokenizer files + ``README.md``.

    save_pretrained(model, "runs/x/export", run_config=cfg)
    model = load_export("runs/x/export")   # identical embeddings (``mlmm.hub.from_pretrained`` also takes repo ids)

Only safetensors and JSON are read back: loading an export never unpickles anything. ``config.json`` holds
``{"mlmm_format", "name", "model", "modalities", "train_config"?, "text_base_model"?, "teachers"?}``; any other
top-level key
(e.g. the text tower's transformers config merged in by :func:`mlmm.hub.interop_open_clip.export_open_clip`) is
ignored by mlmm.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from mlmm.config import ModelConfig
from mlmm.typed import from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
MLMM_CONFIG_KEYS = ("mlmm_format", "name", "model", "modalities", "train_config", "text_base_model", "teachers")
_HF_CONFIG_DROP = ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
                   "_attn_implementation_autoset")


def text_hf_config(model) -> dict[str, Any]:
    """The text tower's transformers config as a plain dict (without paths, versions and architectures)."""
    hf = model.towers["text"].model.config.to_dict()
    return {k: v for k, v in hf.items() if k not in _HF_CONFIG_DROP}


def save_pretrained(model, out_dir: str | Path, *, state_dict: Optional[dict] = None,
                    run_config=None, results_md: Optional[str] = None, teachers: Sequence[dict] = ()) -> Path:
    """Write an export folder. `state_dict` overrides model.state_dict() (e.g. gathered from ZeRO-3); `teachers`:
    the identities of the distillation teachers (:meth:`mlmm.distill.teacher.Teacher.identity`), recorded in
    config.json and the model card."""
    from safetensors.torch import save_file

    from mlmm.hub.card import build_model_card
    from mlmm.hub.pretrained import hub_base_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt", "mlmm_format": str(FORMAT_VERSION)})
    config: dict[str, Any] = {
        "mlmm_format": FORMAT_VERSION,
        "name": getattr(run_config, "name", "mlmm"),
        "model": dataclasses.asdict(model.cfg),
        "modalities": list(model.modalities),
    }
    if run_config is not None:
        config["train_config"] = run_config.to_dict()
    if teachers:
        config["teachers"] = [dict(t) for t in teachers]
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
        config["model"]["text"]["tokenizer"] = "."  # relative to the export folder
    if config["model"].get("text"):
        text = config["model"]["text"]
        pretrained = text.get("pretrained")
        if pretrained:  # rebuild that architecture on load; the weights are in model.safetensors
            text["hf_config"] = text_hf_config(model)
            if hub_base_model(pretrained):
                config["text_base_model"] = hub_base_model(pretrained)  # a Hub model id: the card's `base_model`
        text["pretrained"] = None
    if config["model"].get("image"):  # open_clip init weights: already in model.safetensors
        config["model"]["image"]["pretrained"] = None
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / CARD_NAME).write_text(build_model_card(config, results_md=results_md), encoding="utf-8")
    return out


def read_config(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of an export folder; clear errors for a non-export or a newer format."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not an mlmm export (no {CONFIG_NAME})")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: unreadable JSON ({e})") from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise FileNotFoundError(f"{cfg_file}: not an mlmm export (no 'model' key; a transformers config?)")
    if raw.get("mlmm_format", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: written by a newer mlmm (format {raw['mlmm_format']}); upgrade mlmm")
    return raw


def load_model_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(path)
    raw = read_config(path)
    model_raw = raw["model"]
    if model_raw.get("text") and model_raw["text"].get("tokenizer") == ".":
        model_raw["text"]["tokenizer"] = str(path)
    return from_dict(ModelConfig, model_raw, f"{path / CONFIG_NAME}: model"), raw


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable safetensors file (truncated or tampered?): {e}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model", "spiece.model", "vocab.txt")


def load_tokenizer(path: Path):
    """The tokenizer saved in an export folder; a missing or broken one is a one-line error naming the folder."""
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: tokenizer files missing (none of {', '.join(TOKENIZER_FILES)}); the model "
                                "has a text tower")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
        raise ValueError(f"{path}: tokenizer does not load ({type(e).__name__}: {first})") from None


def load_export(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a MultimodalModel from a local export folder, in eval mode."""
    from mlmm.models.model import MultimodalModel

    path = Path(path)
    model_cfg, _ = load_model_config(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{path}: {WEIGHTS_NAME} missing (an export holds {CONFIG_NAME} + {WEIGHTS_NAME})")
    sd = load_state_dict(path / WEIGHTS_NAME)
    tokenizer = None
    if model_cfg.text is not None:
        tokenizer = load_tokenizer(path)
    model = MultimodalModel(model_cfg, tokenizer)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_NAME}: does not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
