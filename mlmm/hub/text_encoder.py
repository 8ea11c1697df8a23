"""An mlmm text tower as plain transformers + one linear projection (M-CLIP style). Self-contained: it imports only
torch, transformers and safetensors, and is copied as ``mlmm_text_encoder.py`` into every transformers text export.

    from mlmm_text_encoder import MlmmTextEncoder          # (or: from mlmm.hub.text_encoder import ...)
    enc = MlmmTextEncoder.from_pretrained("path/to/text")  # AutoModel + AutoTokenizer + projection
    z = enc.encode(["a red circle", "ein roter Kreis"])    # [2, E], L2-normalised: mlmm's encode_text

The folder holds a standard transformers model (``config.json`` + ``model.safetensors``, loadable with
``AutoModel.from_pretrained``), its tokenizer, and

* ``mlmm_text.json``: ``{"pooling": "mean" | "cls", "normalize": true, "max_length": L, "embed_dim": E}``;
* ``projection.safetensors``: ``weight`` Float[E, D] (no bias).

By hand: ``h = AutoModel(...)(input_ids, attention_mask).last_hidden_state`` [B, L, D]; pool (mean over real
tokens, or token 0) -> [B, D]; ``z = pooled @ weight.T`` -> [B, E]; ``z / ||z||``. The encoder's ``pooler_output``
is not used (its weights are zeros in the export: mlmm towers have no pooler).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SETTINGS_NAME = "mlmm_text.json"
PROJECTION_NAME = "projection.safetensors"


class MlmmTextEncoder(nn.Module):
    """transformers encoder -> pooling -> linear projection -> L2 normalisation."""

    def __init__(self, encoder: nn.Module, projection: torch.Tensor, pooling: str = "mean", normalize: bool = True,
                 max_length: int = 512, tokenizer=None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.projection = nn.Linear(projection.shape[1], projection.shape[0], bias=False)  # D -> E
        with torch.no_grad():
            self.projection.weight.copy_(projection)
        self.pooling, self.normalize, self.max_length, self.tokenizer = pooling, normalize, max_length, tokenizer

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> "MlmmTextEncoder":
        """Load ``folder`` (a local text export); ``kwargs`` go to ``AutoModel.from_pretrained``."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / SETTINGS_NAME).is_file():
            raise FileNotFoundError(f"{folder}: not an mlmm text export (no {SETTINGS_NAME})")
        settings = json.loads((folder / SETTINGS_NAME).read_text(encoding="utf-8"))
        weight = load_file(str(folder / PROJECTION_NAME))["weight"]  # [E, D]
        encoder = AutoModel.from_pretrained(str(folder), **kwargs)
        return cls(encoder, weight, settings["pooling"], settings.get("normalize", True),
                   settings.get("max_length", 512), AutoTokenizer.from_pretrained(str(folder))).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], attention_mask [B, L] (1 = real token) -> [B, E]."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, L, 1]
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # [B, D]
        z = self.projection(pooled)  # [B, E]
        return F.normalize(z, dim=-1) if self.normalize else z

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw strings -> [N, E] with the folder's tokenizer (padding to the longest, truncation at max_length)."""
        if self.tokenizer is None:
            raise ValueError("no tokenizer: build with from_pretrained, or tokenize yourself and call forward")
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = self.projection.weight.device
        return self(tok["input_ids"].to(device), tok["attention_mask"].to(device))
