"""Export and reload: ``config.json`` + ``model.safetensors`` + tokenizer files + ``README.md``.

    save_pretrained(model, "runs/x/export", run_config=cfg)
    model = from_pretrained("runs/x/export")   # identical embeddings

Only safetensors and JSON are read back: loading an export never unpickles anything.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from mlmm.config import ModelConfig, from_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _model_card(config: dict, results_md: Optional[str]) -> str:
    model = config["model"]
    towers = ", ".join(m for m in ("image", "video", "audio", "text") if model.get(m))
    lines = [
        "---",
        "library_name: mlmm",
        "tags: [mlmm, multimodal, multilingual, contrastive]",
        "---",
        f"# {config.get('name', 'mlmm model')}",
        "",
        f"Multimodal embedding model trained with mlmm. Towers: {towers}; embedding size {model['embed_dim']}.",
        "",
        "```python",
        "import mlmm",
        "model = mlmm.from_pretrained('path/to/this/folder')",
        "```",
    ]
    if results_md:
        lines += ["", "## Evaluation", "", results_md]
    return "\n".join(lines) + "\n"


def save_pretrained(model, out_dir: str | Path, *, state_dict: Optional[dict] = None,
                    run_config=None, results_md: Optional[str] = None) -> Path:
    """Write an export folder. `state_dict` overrides model.state_dict() (e.g. gathered from ZeRO-3)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt", "mlmm_format": str(FORMAT_VERSION)})
    config = {
        "mlmm_format": FORMAT_VERSION,
        "name": getattr(run_config, "name", "mlmm"),
        "model": dataclasses.asdict(model.cfg),
        "modalities": list(model.modalities),
    }
    if run_config is not None:
        config["train_config"] = run_config.to_dict()
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
        config["model"]["text"]["tokenizer"] = "."  # relative to the export folder
    if config["model"].get("text"):
        text = config["model"]["text"]
        if text.get("pretrained"):  # rebuild that architecture on load; the weights are in model.safetensors
            hf = model.towers["text"].model.config.to_dict()
            text["hf_config"] = {k: v for k, v in hf.items()
                                 if k not in ("architectures", "_name_or_path", "transformers_version", "dtype",
                                              "torch_dtype", "_attn_implementation_autoset")}
        text["pretrained"] = None
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "README.md").write_text(_model_card(config, results_md), encoding="utf-8")
    return out


def load_model_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not an mlmm export (no {CONFIG_NAME})")
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    if raw.get("mlmm_format", 0) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: written by a newer mlmm (format {raw['mlmm_format']}); upgrade mlmm")
    model_raw = raw["model"]
    if model_raw.get("text") and model_raw["text"].get("tokenizer") == ".":
        model_raw["text"]["tokenizer"] = str(path)
    return from_dict(ModelConfig, model_raw, f"{cfg_file}: model"), raw


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


def from_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a MultimodalModel from an export folder, in eval mode."""
    from mlmm.models.model import MultimodalModel

    path = Path(path)
    model_cfg, _ = load_model_config(path)
    tokenizer = None
    if model_cfg.text is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = MultimodalModel(model_cfg, tokenizer)
    sd = load_state_dict(path / WEIGHTS_NAME)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_NAME}: does not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
