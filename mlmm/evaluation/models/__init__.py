"""Any model behind one interface (:class:`EvalModel`): the ``--model`` flag of every eval entry point.

    model = load_model("runs/x")                                           # mlmm run folder (its export/)
    model = load_model("runs/x/export")                                    # mlmm export folder (or "mlmm:org/name")
    model = load_model("open_clip:ViT-B-32", pretrained="laion2b_s34b_b79k")   # or "open_clip:ViT-B-32,pretrained=..."
    model = load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")     # open_clip from the Hub
    model = load_model("local-dir:path/to/open_clip_folder")
    model = load_model("transformers:openai/clip-vit-base-patch32")        # any AutoModel with get_*_features
    model = load_model("mclip:M-CLIP/XLM-Roberta-Large-Vit-B-32,image=ViT-B-32,pretrained=openai")

Options follow the name after commas (``key=value``): ``pretrained`` (open_clip tag or file), ``config`` (a folder or
JSON of open_clip model configs to register), ``image`` (mclip's open_clip image tower), ``frames`` (frames per
video for image-only models). Hub ids may carry ``@revision``. A folder without a prefix is recognised by its files.
Every failure to load is a :class:`ModelLoadError` whose message is one line naming the path and what is missing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from mlmm.evaluation.models.base import EvalModel, MediaTransform
from mlmm.evaluation.models.mlmm_model import MlmmEvalModel, as_eval_model

PREFIXES = ("mlmm", "open_clip", "hf-hub", "local-dir", "transformers", "mclip")
OPTIONS = ("pretrained", "config", "image", "frames")

__all__ = ["EvalModel", "MediaTransform", "MlmmEvalModel", "ModelLoadError", "as_eval_model", "detect_kind",
           "load_model", "parse_model_spec"]


class ModelLoadError(ValueError):
    """A model that cannot be loaded; ``str(e)`` is one line naming the path and what is missing."""


def parse_model_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"open_clip:ViT-B-32,pretrained=x,frames=4"`` -> ``("open_clip:ViT-B-32", {"pretrained": "x",
    "frames": "4"})``."""
    head, *rest = str(spec).split(",")
    options: dict[str, str] = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in OPTIONS:
            raise ModelLoadError(f"--model {spec}: option {part!r} is not one of {', '.join(f'{o}=' for o in OPTIONS)}")
        options[key.strip()] = value.strip()
    return head.strip(), options


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({e})") from None
    return raw if isinstance(raw, dict) else {}


def detect_kind(path: Path) -> str:
    """What a local folder holds: ``mlmm`` (an export or a run folder with export/), ``local-dir`` (open_clip),
    ``transformers``; raises ModelLoadError naming what is missing otherwise."""
    from mlmm.hub.text_encoder import SETTINGS_NAME

    if not path.is_dir():
        prefixes = ", ".join(p + ":" for p in PREFIXES)
        raise ModelLoadError(f"{path}: no such folder (other models take a prefix: {prefixes})"
                             if not path.exists() else f"{path}: a file, not a model folder")
    config = path / "config.json"
    raw = _read_json(config) if config.is_file() else {}
    if "mlmm_format" in raw or "model" in raw or (path / "export").is_dir():
        return "mlmm"
    if (path / "open_clip_config.json").is_file():
        return "local-dir"
    if (path / SETTINGS_NAME).is_file() or raw.get("model_type") == "M-CLIP":
        raise ModelLoadError(f"{path}: a text encoder only; pair it with an image tower: "
                             f"--model mclip:{path},image=ARCH,pretrained=TAG")
    if raw.get("model_type"):
        return "transformers"
    if (path / "checkpoints").is_dir() or (path / "mlmm_state.json").is_file():
        raise ModelLoadError(f"{path}: a run folder without export/ (the run never exported: finish or resume it, "
                             "then evaluate RUN or RUN/export)")
    raise ModelLoadError(f"{path}: not a model folder (no config.json, export/config.json or open_clip_config.json)")


def _load(head: str, opts: dict[str, str], device, pretrained: Optional[str]) -> EvalModel:
    from mlmm.evaluation.models.mclip_model import MClipEvalModel
    from mlmm.evaluation.models.open_clip_model import OpenClipEvalModel
    from mlmm.evaluation.models.transformers_model import TransformersEvalModel

    from mlmm.sources import HubId, parse_source

    kind, _, rest = head.partition(":")
    if kind not in PREFIXES or not rest:
        src = parse_source(head)
        if isinstance(src, HubId) and "/" in head:
            kind, rest = "mlmm", head  # "org/name": an mlmm export on the Hub (mlmm.from_pretrained)
        else:
            kind, rest = detect_kind(Path(head)), head
    if kind in ("hf-hub", "local-dir"):
        kind, rest = "open_clip", f"{kind}:{rest}"
    frames = int(opts.get("frames", 8))
    pretrained = opts.get("pretrained", pretrained)
    if kind == "mlmm":
        if Path(rest).exists():
            detect_kind(Path(rest))  # one-line error for a folder that is not an export / run folder
        return MlmmEvalModel.load(rest, device=device)
    if kind == "open_clip":
        return OpenClipEvalModel(rest, pretrained, device, config=opts.get("config"), frames=frames)
    if kind == "transformers":
        return TransformersEvalModel(rest, device, frames=frames)
    return MClipEvalModel(rest, image=opts.get("image"), pretrained=pretrained, device=device,
                          config=opts.get("config"), frames=frames)


def load_model(spec: str, device: str | torch.device = "cpu", *, pretrained: Optional[str] = None) -> EvalModel:
    """Load ``spec`` (see the module doc); ``pretrained`` is the default for ``pretrained=``.

    Raises :class:`ModelLoadError` (one line: the path or name, and what is missing or broken) for every failure to
    load, never a tokenizer or state_dict traceback."""
    head, opts = parse_model_spec(spec)
    try:
        return _load(head, opts, device, pretrained)
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        where = "" if head in first or str(Path(head)) in first else f"{head}: "
        raise ModelLoadError(f"{where}{first}") from e
