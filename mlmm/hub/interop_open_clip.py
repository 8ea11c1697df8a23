"""open_clip interop: export an mlmm image–text model as an open_clip model, and initialise mlmm towers from one.

    export_open_clip(model, "runs/x/export")       # + open_clip_config.json + open_clip_model.safetensors
    open_clip.create_model_and_transforms("local-dir:runs/x/export")   # same embeddings (to 1e-5)
    load_open_clip_into(model, "ViT-B-32.safetensors")                 # train.init_from: image/text towers

**Which mlmm models export.** mlmm's image tower is open_clip's ``VisionTransformer`` (same parameter names, CLS
pooling, ``ln_post``, exact GELU), so every image tower maps to a ``vision_cfg``. mlmm's text tower is a transformers
encoder, which open_clip runs through its HF adapter (``CustomTextCLIP`` with ``text_cfg.hf_model_name``, linear
projection without bias, ``mean_pooler`` / ``cls_last_hidden_state_pooler``). So a model exports when it has an image
and a text tower, the text tower is a ``bert``, ``roberta`` or ``xlm-roberta`` encoder (open_clip's adapter supports
no other encoder-only type), its tokenizer pads on the right with the model's ``pad_token_id`` (open_clip derives
the attention mask from that id). Video / audio towers and task heads are not part of an open_clip model and are
left out (with a warning); ``logit_scale`` is the config's ``init_logit_scale`` (the trained temperatures live in the
loss). Anything else raises :class:`NotOpenClipCompatible` listing the reasons.

**Where the text config lives.** open_clip builds the HF text tower from ``AutoConfig.from_pretrained(hf_model_name)``.
The export therefore merges the text tower's transformers config into the folder's ``config.json`` (mlmm ignores
those keys) and sets ``hf_model_name`` / ``hf_tokenizer_name`` to the folder (absolute path) or, when publishing, to
the Hub repo id, so that ``local-dir:`` and ``hf-hub:`` both resolve. Moving a local folder means re-exporting.

**Initialising from open_clip.** A weights file (``.safetensors``, ``.pt``, ``.bin``; open_clip's own loader, with
``weights_only``) or an open_clip folder: ``visual.*`` fills mlmm's image tower and ``visual.proj`` its projection
(when ``embed_dim`` matches); an HF text tower (``text.transformer.*``) fills mlmm's text tower. open_clip's causal
``TextTransformer`` has no mlmm counterpart and is skipped. When an open_clip model config is at hand
(``open_clip_config.json``, or ``<stem>.json`` next to the weights) the head count and block options are checked too.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mlmm.data.transforms import OPENAI_DATASET_MEAN as OPENAI_MEAN, OPENAI_DATASET_STD as OPENAI_STD
from mlmm.hub.export import CONFIG_NAME, MLMM_CONFIG_KEYS, text_hf_config

log = logging.getLogger("mlmm")

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TEXT_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
TEXT_ARCHS = ("bert", "roberta", "xlm-roberta")  # encoder-only types of open_clip.hf_configs.arch_dict
_WEIGHT_FILES = (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_MLMM_VIT_DEFAULTS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                      "final_ln_after_pool": False, "pool_type": "tok", "pos_embed_type": "learnable",
                      "timm_model_name": None, "patch_dropout": 0.0, "act_kwargs": None, "norm_kwargs": None}


class NotOpenClipCompatible(ValueError):
    """The model's towers have no open_clip counterpart (the message lists why)."""


# ---------------------------------------------------------------------------------------------------- export
def open_clip_problems(model) -> list[str]:
    """Why ``model`` cannot be an open_clip model ([] = exportable)."""
    towers = list(model.towers)
    if "image" not in towers or "text" not in towers:
        return [f"open_clip models have an image and a text tower; this model has {towers}"]
    if not hasattr(model.towers["text"], "model"):  # the native (arch: clip) tower: bidirectional, mean/CLS pooled
        return [f"text tower arch {model.cfg.text.arch!r} (mlmm's native tower) has no open_clip counterpart: "
                "open_clip's own text tower is causal with EOT pooling, and its HF adapter needs a transformers model"]
    problems = []
    hf = model.towers["text"].model.config
    if hf.model_type not in TEXT_ARCHS or getattr(hf, "is_encoder_decoder", False):
        problems.append(f"text tower arch {hf.model_type!r}: open_clip's HF text adapter supports {list(TEXT_ARCHS)}")
    if model.cfg.text.pooling not in TEXT_POOLERS:
        problems.append(f"text pooling {model.cfg.text.pooling!r} has no open_clip pooler")
    tok = model.tokenizer
    if tok is None or tok.pad_token_id is None or tok.pad_token_id != hf.pad_token_id:
        problems.append(f"tokenizer pad id {getattr(tok, 'pad_token_id', None)} != text config pad_token_id "
                        f"{hf.pad_token_id} (open_clip builds the attention mask from pad_token_id)")
    elif getattr(tok, "padding_side", "right") != "right":
        problems.append("tokenizer pads on the left; open_clip pads on the right")
    return problems


def open_clip_config(model, hf_model_name: str) -> dict[str, Any]:
    """``open_clip_config.json`` content: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    img, text = model.cfg.image, model.cfg.text
    vision = {"image_size": img.image_size, "patch_size": img.patch_size, "width": img.width, "layers": img.layers,
              "head_width": img.width // img.heads, "mlp_ratio": img.mlp_ratio}
    text_cfg = {"hf_model_name": hf_model_name, "hf_tokenizer_name": hf_model_name, "hf_proj_type": "linear",
                "hf_pooler_type": TEXT_POOLERS[text.pooling], "context_length": text.max_length}
    preprocess = {"size": img.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    return {"model_cfg": {"embed_dim": model.cfg.embed_dim, "custom_text": True, "vision_cfg": vision,
                          "text_cfg": text_cfg}, "preprocess_cfg": preprocess}


def to_open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """mlmm weights under open_clip ``CustomTextCLIP`` names (``visual.*``, ``text.*``, ``logit_scale``)."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.towers["image"].state_dict().items():
        sd[f"visual.{k}"] = v
    sd["visual.proj"] = model.proj["image"].weight.t()  # [W, E]: open_clip computes pooled @ proj
    for k, v in model.towers["text"].model.state_dict().items():
        sd[f"text.transformer.{k}"] = v
    sd["text.proj.weight"] = model.proj["text"].weight  # [E, D]
    sd["logit_scale"] = torch.tensor(float(model.cfg.init_logit_scale))
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def _merge_text_config(out: Path, model) -> None:
    """Make ``out/config.json`` loadable by ``AutoConfig`` as the text tower (keeping mlmm's keys, if any)."""
    path = out / CONFIG_NAME
    raw = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    hf = text_hf_config(model)
    clash = sorted(set(hf) & set(MLMM_CONFIG_KEYS))
    if clash:
        raise NotOpenClipCompatible(f"text config keys {clash} clash with mlmm's config.json keys")
    raw.update(hf)
    path.write_text(json.dumps(raw, indent=2, ensure_ascii=False), encoding="utf-8")


def export_open_clip(model, out_dir: str | Path, *, hf_model_name: Optional[str] = None) -> Path:
    """Add ``open_clip_config.json`` + ``open_clip_model.safetensors`` (+ tokenizer, text config) to ``out_dir``.

    ``hf_model_name``: where open_clip finds the text config and tokenizer, default this folder (absolute path);
    pass the Hub repo id when the folder is uploaded as is (``mlmm.hub.publish`` does).
    """
    from safetensors.torch import save_file

    problems = open_clip_problems(model)
    if problems:
        raise NotOpenClipCompatible("cannot export to open_clip: " + "; ".join(problems) + " (see docs/hub-interop.md:"
                                    " 'Using mlmm checkpoints from open_clip / transformers')")
    dropped = [m for m in model.modalities if m not in ("image", "text")] + [f"head {h}" for h in model.heads]
    if dropped:
        log.warning("open_clip export keeps the image and text towers only; left out: %s", dropped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer_config.json").is_file():
        model.tokenizer.save_pretrained(str(out))
    _merge_text_config(out, model)
    name = hf_model_name or str(out.resolve())
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(open_clip_config(model, name), indent=2), encoding="utf-8")
    save_file(to_open_clip_state_dict(model), str(out / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------------------------- import
def is_open_clip_source(source: str | Path) -> bool:
    """A weights file, ``local-dir:DIR`` or a folder with open_clip_config.json that is not an mlmm export."""
    s = str(source)
    if s.startswith("local-dir:"):
        return True
    p = Path(s)
    if p.is_file():
        return p.suffix in _WEIGHT_SUFFIXES
    if p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file():
        cfg = p / CONFIG_NAME
        return not (cfg.is_file() and "mlmm_format" in json.loads(cfg.read_text(encoding="utf-8")))
    return False


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from mlmm.hub.export import load_state_dict

        return load_state_dict(path)
    from open_clip.factory import load_state_dict as open_clip_load  # torch.load(weights_only=True)

    return open_clip_load(str(path), weights_only=True)


def _model_cfg(raw: dict) -> Optional[dict]:
    """The model config of an ``open_clip_config.json`` ({"model_cfg", "preprocess_cfg"}) or of a bare model config,
    with the image mean/std the weights were trained with under ``preprocess_cfg`` when the file gives them."""
    model_cfg = raw.get("model_cfg", raw)
    if model_cfg is not None and raw.get("preprocess_cfg"):
        model_cfg = {**model_cfg, "preprocess_cfg": raw["preprocess_cfg"]}
    return model_cfg


def read_open_clip_source(source: str | Path) -> tuple[dict[str, torch.Tensor], Optional[dict], str]:
    """(state dict, open_clip model_cfg or None, a name for messages) of a file or folder."""
    s = str(source)
    path = Path(s[len("local-dir:"):] if s.startswith("local-dir:") else s)
    model_cfg = None
    if path.is_dir():
        cfg_file = path / OPEN_CLIP_CONFIG
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path}: no {OPEN_CLIP_CONFIG} (not an open_clip folder)")
        model_cfg = _model_cfg(json.loads(cfg_file.read_text(encoding="utf-8")))
        weights = next((path / n for n in _WEIGHT_FILES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: no open_clip weights ({', '.join(_WEIGHT_FILES)})")
    elif path.is_file():
        weights = path
        for cand in (path.with_suffix(".json"), path.parent / OPEN_CLIP_CONFIG):
            if cand.is_file():
                raw = json.loads(cand.read_text(encoding="utf-8"))
                model_cfg = _model_cfg(raw) if isinstance(raw, dict) else None
                if model_cfg and "vision_cfg" in model_cfg:
                    break
                model_cfg = None
    else:
        raise FileNotFoundError(f"{path}: open_clip checkpoint not found")
    return _read_weights(weights), model_cfg, str(weights)


def _check_vision_cfg(cfg, vision: dict, quick_gelu: bool, where: str, preprocess: Optional[dict] = None) -> None:
    """The open_clip vision_cfg describes the same network as mlmm's ImageTowerConfig ``cfg``; warns when the
    weights expect QuickGELU or another image normalisation (``preprocess``: open_clip's mean / std)."""
    preprocess = preprocess or {}
    want = {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.width, "layers": cfg.layers,
            "heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio}
    have = {"image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
            "width": vision.get("width", 768), "layers": vision.get("layers", 12),
            "mlp_ratio": vision.get("mlp_ratio", 4.0)}
    have["heads"] = have["width"] // vision.get("head_width", 64)
    diff = [f"model.image.{k}={want[k]} but the checkpoint has {have[k]}" for k in want if want[k] != have[k]]
    diff += [f"vision_cfg.{k}={vision[k]!r} (mlmm's ViT needs {v!r})" for k, v in _MLMM_VIT_DEFAULTS.items()
             if k in vision and vision[k] != v]
    if diff:
        raise ValueError(f"{where}: open_clip vision tower does not match mlmm's image tower: " + "; ".join(diff))
    if quick_gelu:
        log.warning("%s: the open_clip model uses QuickGELU, mlmm's towers use exact GELU: the loaded image tower "
                    "is a close initialisation, not the same function", where)
    mean, std = preprocess.get("mean"), preprocess.get("std")
    if (mean is not None and not _close(mean, OPENAI_MEAN)) or (std is not None and not _close(std, OPENAI_STD)):
        log.warning("%s: the open_clip weights were trained on images normalised with mean %s / std %s; mlmm's image "
                    "transforms use CLIP's %s / %s: the loaded image tower sees shifted inputs (a close "
                    "initialisation, not the same function)", where, list(mean or OPENAI_MEAN),
                    list(std or OPENAI_STD), list(OPENAI_MEAN), list(OPENAI_STD))


def _close(a, b) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) < 1e-6 for x, y in zip(a, b))


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{where} does not fit mlmm's tower: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                         f"shape mismatches {shapes[:4]} (set the model config to the checkpoint's sizes)")
    module.load_state_dict(sd, strict=True)


def _load_projection(model, modality: str, weight: torch.Tensor, where: str) -> bool:
    """weight [E, D] into model.proj[modality] when the shapes agree (else keep the initialisation)."""
    own = model.proj[modality].weight
    if tuple(own.shape) != tuple(weight.shape):
        log.warning("%s: %s projection is %s, mlmm's is %s (embed_dim differs): left as initialised", where,
                    modality, tuple(weight.shape), tuple(own.shape))
        return False
    with torch.no_grad():
        own.copy_(weight)
    return True


def load_open_clip_into(model, source: str | Path, towers: tuple[str, ...] = ("image", "text"),
                        model_cfg: Optional[dict] = None) -> list[str]:
    """Initialise ``model``'s image / text towers (+ projections) from an open_clip checkpoint; only ``towers``.

    ``model_cfg``: the open_clip model config to check the weights against (a pretrained tag's built-in config
    with what the tag says beside it), else the one next to the weights. Returns the model state-dict keys left as
    they were (towers the checkpoint does not provide)."""
    sd, found_cfg, where = read_open_clip_source(source)
    model_cfg = model_cfg or found_cfg  # a tag's config (its QuickGELU, mean/std) over the one beside its file
    loaded: list[str] = []
    if "image" in model.towers and "image" in towers and any(k.startswith("visual.") for k in sd):
        vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        if model_cfg is not None:
            _check_vision_cfg(model.cfg.image, model_cfg.get("vision_cfg", {}), bool(model_cfg.get("quick_gelu")),
                              where, model_cfg.get("preprocess_cfg"))
        else:
            log.warning("%s: no open_clip model config next to the weights: head count not verified", where)
        proj = vis.pop("proj", None)  # [W, E]
        _load_strict(model.towers["image"], vis, f"{where}: visual.*")
        loaded.append("towers.image.")
        if proj is not None and _load_projection(model, "image", proj.t(), where):
            loaded.append("proj.image.")
    if "text" in model.towers and "text" in towers and any(k.startswith("text.transformer.") for k in sd):
        txt = {k[len("text.transformer."):]: v for k, v in sd.items() if k.startswith("text.transformer.")}
        txt = {k: v for k, v in txt.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        _load_strict(model.towers["text"].model, txt, f"{where}: text.transformer.*")
        loaded.append("towers.text.")
        if "text.proj.weight" in sd and _load_projection(model, "text", sd["text.proj.weight"], where):
            loaded.append("proj.text.")
    elif "text" in model.towers and "text" in towers and "token_embedding.weight" in sd:
        log.info("%s: open_clip's causal text transformer has no mlmm counterpart; text tower left as is", where)
    if not loaded:
        raise ValueError(f"{where}: no open_clip tower fits this model (checkpoint keys like "
                         f"{sorted(sd)[:3]}; model towers {model.modalities})")
    done = {v.data_ptr() for k, v in model.state_dict().items() if k.startswith(tuple(loaded))}
    keep = sorted(k for k, v in model.state_dict().items() if v.data_ptr() not in done)  # shared towers count once
    log.info("initialised %s from open_clip %s; left as initialised: %d tensors", loaded, where, len(keep))
    return keep
