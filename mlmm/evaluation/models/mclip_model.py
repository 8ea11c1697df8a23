"""M-CLIP-style pairs: a multilingual text encoder + projection, with the image tower of a named open_clip model.

    --model mclip:M-CLIP/XLM-Roberta-Large-Vit-B-32,image=ViT-B-32,pretrained=openai
    --model mclip:runs/x/text,image=local-dir:path/to/open_clip_folder

The text side is either

* an M-CLIP folder or Hub repo (``config.json`` with ``model_type: M-CLIP``: ``modelBase``, ``transformerDimensions``,
  ``numDims``; weights ``transformer.*`` + ``LinearTransformation.{weight,bias}``; its tokenizer): mean of the
  encoder's last hidden states over real tokens, then the linear map (M-CLIP's ``MultilingualCLIP.forward``; inputs
  longer than the encoder's positions are truncated), or
* an mlmm text export (``mlmm_text.json``, :mod:`mlmm.hub.text_encoder`: ``MlmmTextEncoder.encode``).

The image side is :class:`~mlmm.evaluation.models.open_clip_model.OpenClipEvalModel` (``encode_image``, its eval
preprocess). Only image, video (frame mean) and text are embedded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mlmm.evaluation.models.base import EvalModel
from mlmm.evaluation.models.open_clip_model import OpenClipEvalModel

MCLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _local_folder(source: str) -> Path:
    """A local folder as is; a Hub repo id (``org/name[@revision]``, :func:`mlmm.sources.parse_source`) through
    huggingface_hub's cache (offline: the cache only)."""
    from mlmm.hub.pretrained import require_cached
    from mlmm.sources import parse_source

    src = parse_source(source)
    if isinstance(src, Path):
        if not src.is_dir():
            raise FileNotFoundError(f"{source}: no such folder, and not a Hugging Face Hub id ('org/name')")
        return src
    from huggingface_hub import snapshot_download

    require_cached(src, "--model mclip")
    try:
        return Path(snapshot_download(src.repo_id, revision=src.revision, allow_patterns=[
            "*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model.bin"]))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--model mclip: {src} could not be fetched ({type(e).__name__}); fetch it once "
                                f"with: {src.fetch_command()}") from e


class MClipText(nn.Module):
    """M-CLIP's text encoder: transformers encoder -> mean over real tokens -> ``LinearTransformation`` (with bias)."""

    def __init__(self, folder: Path):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        missing = [k for k in ("modelBase", "transformerDimensions", "numDims") if k not in cfg]
        if missing:
            raise ValueError(f"{folder / 'config.json'}: M-CLIP config without {missing}")
        weights = next((folder / n for n in MCLIP_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{folder}: no M-CLIP weights ({' or '.join(MCLIP_WEIGHTS)})")
        from mlmm.hub.pretrained import load_hf

        base = cfg["modelBase"]  # a Hub id (M-CLIP: "xlm-roberta-large"), or a folder beside the config
        base_cfg = load_hf(AutoConfig.from_pretrained, str(folder / base) if (folder / base).is_dir() else base,
                           f"{folder / 'config.json'}: modelBase")
        self.transformer = AutoModel.from_config(base_cfg, add_pooling_layer=False) \
            if base_cfg.model_type in ("bert", "roberta", "xlm-roberta") else AutoModel.from_config(base_cfg)
        self.LinearTransformation = nn.Linear(int(cfg["transformerDimensions"]), int(cfg["numDims"]))
        sd = _read_weights(weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("transformer.pooler.")
              and k != "transformer.embeddings.position_ids"}
        missing_keys, unexpected = self.load_state_dict(sd, strict=False)
        if missing_keys or unexpected:
            raise ValueError(f"{weights}: does not fit M-CLIP over {base} (missing {missing_keys[:4]}, "
                             f"unexpected {unexpected[:4]})")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.max_length = int(getattr(base_cfg, "max_position_embeddings", 512)) - \
            (int(getattr(base_cfg, "pad_token_id", 0) or 0) + 1 if "roberta" in base_cfg.model_type else 0)

    def encode(self, texts: list[str], device) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        att = tok["attention_mask"].to(device)  # [B, L]
        h = self.transformer(input_ids=tok["input_ids"].to(device), attention_mask=att)[0]  # [B, L, D]
        pooled = (h * att.unsqueeze(2)).sum(dim=1) / att.sum(dim=1)[:, None]  # [B, D]
        return self.LinearTransformation(pooled)  # [B, E]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from mlmm.hub.export import load_state_dict

        return load_state_dict(path)
    return torch.load(path, map_location="cpu", weights_only=True)  # no unpickling of arbitrary objects


class MlmmTextExport(nn.Module):
    """An mlmm transformers text export (:class:`mlmm.hub.text_encoder.MlmmTextEncoder`)."""

    def __init__(self, folder: Path):
        super().__init__()
        from mlmm.hub.text_encoder import MlmmTextEncoder

        self.enc = MlmmTextEncoder.from_pretrained(folder)
        self.tokenizer = self.enc.tokenizer

    def encode(self, texts: list[str], device) -> torch.Tensor:
        return self.enc.encode(texts)


class MClipEvalModel(EvalModel):
    def __init__(self, text: str, *, image: Optional[str], pretrained: Optional[str] = None,
                 device: str | torch.device = "cpu", config: Optional[str] = None, frames: int = 8):
        from mlmm.hub.text_encoder import SETTINGS_NAME

        super().__init__(device)
        if not image:
            raise ValueError(f"mclip:{text}: name the image tower, e.g. mclip:{text},image=ViT-B-32,pretrained=openai")
        folder = _local_folder(text)
        if (folder / SETTINGS_NAME).is_file():
            self.text = MlmmTextExport(folder)
        elif (folder / "config.json").is_file():
            self.text = MClipText(folder)
        else:
            raise FileNotFoundError(f"{folder}: neither an M-CLIP folder (config.json) nor an mlmm text export "
                                    f"({SETTINGS_NAME})")
        self.text.to(self.device).eval()
        self.image = OpenClipEvalModel(image, pretrained, device, config=config, frames=frames)
        self.tokenizer = self.text.tokenizer
        self.modalities = ("image", "video", "text")
        self.name = f"mclip:{text}+{image}"
        self.pretrained = self.image.pretrained

    def transform(self):
        return self.image.transform()

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self.image._encode(modality, x)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.text.encode(texts, self.device)
