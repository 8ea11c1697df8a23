"""mlmm exports and run folders as :class:`~mlmm.evaluation.models.base.EvalModel`.

    model = MlmmEvalModel.load("runs/x")          # a run folder (its export/), an export folder or a Hub repo id
    model = MlmmEvalModel(multimodal_model)        # an in-memory MultimodalModel
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from mlmm.evaluation.models.base import EvalModel, MediaTransform


class MlmmTransform(MediaTransform):
    """mlmm's eval preprocessing (:class:`~mlmm.data.preprocess.Preprocessor` with ``train=False``)."""

    def __init__(self, preprocessor):
        super().__init__([m for m in preprocessor.shapes if m != "text"])
        self.pre = preprocessor

    def __call__(self, raw: dict[str, Any], modalities=None) -> dict[str, torch.Tensor]:
        out = self.pre.media(raw)  # raises SampleError for what it cannot decode
        return {m: x for m, x in out.items() if modalities is None or m in modalities}


class MlmmEvalModel(EvalModel):
    def __init__(self, model, *, name: Optional[str] = None, pretrained: str = ""):
        super().__init__(next(model.parameters()).device)
        self.mlmm = model.eval()
        self.modalities = tuple(model.modalities)
        self.tokenizer = model.tokenizer
        self.dtype = next(model.parameters()).dtype
        self.name = name or f"mlmm:{getattr(model.cfg, 'name', None) or 'model'}"
        self.pretrained = pretrained

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "MlmmEvalModel":
        """An export folder, a run folder (uses its ``export/``) or a Hub repo id (:func:`mlmm.hub.from_pretrained`)."""
        from mlmm.hub.download import from_pretrained, resolve_pretrained
        from mlmm.hub.export import read_config

        folder = resolve_pretrained(path)
        model = from_pretrained(folder, device=device)
        name = read_config(folder).get("name") or Path(folder).name
        return cls(model, name=f"mlmm:{name}", pretrained=str(path))

    def transform(self) -> MlmmTransform:
        from mlmm.data.preprocess import Preprocessor

        return MlmmTransform(Preprocessor(self.mlmm.cfg, self.tokenizer, train=False))

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self.mlmm.encode(modality, x.to(self.dtype), normalize=False)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        ids, att = self.mlmm.tokenize_text(texts, self.device)
        return self.mlmm.encode("text", ids, att, normalize=False)


def as_eval_model(model, device: Optional[str | torch.device] = None) -> EvalModel:
    """An :class:`EvalModel` as is, or a MultimodalModel wrapped (the evaluators accept either)."""
    if isinstance(model, EvalModel):
        return model
    if device is not None:
        model = model.to(device)
    return MlmmEvalModel(model)
