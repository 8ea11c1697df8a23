"""Export an mlmm text tower as a plain transformers folder (the way M-CLIP publishes its text encoders).

    export_transformers_text(model, "runs/x/text")
    AutoModel.from_pretrained("runs/x/text")                     # the encoder, no mlmm needed
    MlmmTextEncoder.from_pretrained("runs/x/text").encode(texts) # = model.encode_text(texts) (to 1e-5)

Folder: ``config.json`` + ``model.safetensors`` (the encoder, standard transformers names), tokenizer files,
``mlmm_text.json`` (pooling, normalisation, max length), ``projection.safetensors`` (``weight`` [E, D]),
``mlmm_text_encoder.py`` (a copy of :mod:`mlmm.hub.text_encoder`, the documented pooling + projection module) and
a short ``README.md``. Every mlmm text tower qualifies (it is a transformers encoder); a pooler that the default
transformers class would add (BERT's) is written as zeros so ``AutoModel`` loads every weight.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from mlmm.hub import text_encoder

MODULE_NAME = "mlmm_text_encoder.py"


def _encoder_state(model) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(a fresh default ``AutoModel`` of the tower's config, the tower's weights completed for it)."""
    from transformers import AutoModel

    tower = model.towers["text"].model
    ref = AutoModel.from_config(copy.deepcopy(tower.config))
    own = {k: v.detach().cpu() for k, v in tower.state_dict().items()}
    want = ref.state_dict()
    extra = sorted(k for k in own if k not in want)
    missing = sorted(k for k in want if k not in own)
    bad = [k for k in missing if not k.startswith("pooler.")]
    if extra or bad:
        raise ValueError(f"text tower ({type(tower).__name__}) does not match a default "
                         f"{type(ref).__name__}: unexpected {extra[:5]}, missing {bad[:5]}")
    merged = {**own, **{k: torch.zeros_like(want[k]) for k in missing}}  # pooler.* -> zeros (unused by mlmm)
    ref.load_state_dict(merged, strict=True)
    return ref.eval(), merged


def export_transformers_text(model, out_dir: str | Path) -> Path:
    """Write the text tower of ``model`` (+ tokenizer, pooling, projection) to ``out_dir``; return it."""
    from safetensors.torch import save_file

    if "text" not in model.towers:
        raise ValueError(f"transformers text export: the model has no text tower (towers: {model.modalities})")
    if model.tokenizer is None:
        raise ValueError("transformers text export: the model has no tokenizer")
    if not hasattr(model.towers["text"], "model"):
        raise ValueError(f"transformers text export: text arch {model.cfg.text.arch!r} is mlmm's native tower, not a "
                         "transformers model; export it with mlmm's own format (save_pretrained)")
    if model.cfg.text.pooling not in ("mean", "cls"):
        raise ValueError(f"transformers text export: model.text.pooling {model.cfg.text.pooling!r} is not supported "
                         "by the standalone text encoder (mean | cls)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder, _ = _encoder_state(model)
    encoder.save_pretrained(str(out))
    model.tokenizer.save_pretrained(str(out))
    weight = model.proj["text"].weight.detach().cpu().contiguous()  # [E, D]
    save_file({"weight": weight}, str(out / text_encoder.PROJECTION_NAME), metadata={"format": "pt"})
    cfg = model.cfg.text
    settings = {"pooling": cfg.pooling, "normalize": True, "max_length": cfg.max_length,
                "embed_dim": int(weight.shape[0]), "hidden_size": int(weight.shape[1]),
                "projection": text_encoder.PROJECTION_NAME, "module": MODULE_NAME}
    (out / text_encoder.SETTINGS_NAME).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    shutil.copyfile(text_encoder.__file__, out / MODULE_NAME)
    (out / "README.md").write_text(_readme(settings), encoding="utf-8")
    return out


def _readme(settings: dict) -> str:
    pool = "mean over real tokens" if settings["pooling"] == "mean" else "the first token"
    return "\n".join([
        "---", "library_name: transformers", "tags: [mlmm, feature-extraction, multilingual]", "---",
        "# mlmm text tower", "",
        f"A transformers encoder plus pooling ({pool}) and a linear projection to {settings['embed_dim']} dims, "
        "then L2 normalisation: the text side of an mlmm multimodal embedding model.", "",
        "```python", "from transformers import AutoModel, AutoTokenizer",
        "from safetensors.torch import load_file", "import torch.nn.functional as F", "",
        'encoder, tokenizer = AutoModel.from_pretrained("."), AutoTokenizer.from_pretrained(".")',
        'W = load_file("projection.safetensors")["weight"]              # [E, D]',
        'tok = tokenizer(["a red circle"], padding=True, return_tensors="pt")',
        "h = encoder(**tok).last_hidden_state                          # [B, L, D]",
        'm = tok["attention_mask"].unsqueeze(-1).float()',
        "z = F.normalize(((h * m).sum(1) / m.sum(1)) @ W.T, dim=-1)     # [B, E]" if settings["pooling"] == "mean"
        else "z = F.normalize(h[:, 0] @ W.T, dim=-1)                       # [B, E]",
        "```", "", f"Or: `from mlmm_text_encoder import MlmmTextEncoder` ({MODULE_NAME} in this folder).", ""])
