"""open_clip models as :class:`~mlmm.evaluation.models.base.EvalModel`.

    --model open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k    # a built-in architecture + a pretrained tag or file
    --model open_clip:ViT-B-32:laion2b_s34b_b79k               # the same, open_clip's one-string form
    --model open_clip:MyArch,pretrained=ckpt.pt,config=cfgs/   # an architecture from your own config JSON(s)
    --model hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K      # a Hub repo with open_clip_config.json
    --model local-dir:path/to/folder                          # the same, from a local folder

Weights are resolved by :func:`mlmm.hub.pretrained.resolve_open_clip` (open_clip's own download functions and
caches; offline with ``HF_HUB_OFFLINE=1``; a missing one is a one-line error with the command that fetches it).
Embeddings are ``model.encode_image`` / ``encode_text`` after ``model.eval()`` on the inputs of open_clip's eval
``preprocess`` and tokenizer; videos are embedded frame by frame and averaged. Text: a causal tower pooled at the
end-of-text token runs each batch only up to its last pooled position, with batches sorted by length
(:mod:`mlmm.evaluation.models.text_trim`: the same embeddings to float rounding); other towers run ``encode_text``
on all ``context_length`` positions. Random weights are refused: an
architecture needs ``pretrained=TAG|FILE`` (``pretrained=random`` to evaluate an untrained network on purpose).
"""
from __future__ import annotations

from typing import Optional

import torch

from mlmm.evaluation.models.base import EvalModel, PilImageTransform, mean_of_frames
from mlmm.evaluation.models.text_trim import OpenClipCausalText


class OpenClipEvalModel(EvalModel):
    def __init__(self, name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu", *,
                 config: Optional[str] = None, frames: int = 8):
        import open_clip

        from mlmm.hub.pretrained import resolve_open_clip, split_open_clip_name

        super().__init__(device)
        arch = name[len("open_clip:"):] if name.startswith("open_clip:") else name
        if config:
            open_clip.add_model_config(config)
        random = pretrained == "random"
        # the weights are resolved (and fetched into the caches, offline: found there) or refused in one line ...
        src = resolve_open_clip(arch, None if random else pretrained, where="--model", allow_random=random)
        # ... then open_clip builds the model and its eval transform as create_model_and_transforms always does
        # (a tag also brings its own mean / std / interpolation)
        tag = src.identity.get("pretrained")
        weights = None if src.model_name.startswith("local-dir:") else (tag or src.weights)
        self.model, _, preprocess = open_clip.create_model_and_transforms(src.model_name, pretrained=weights,
                                                                          device=self.device)
        self.model.eval()
        self.tokenizer = src.tokenizer()
        self.trimmed = OpenClipCausalText.of(self.model)  # None: encode_text on every position, as open_clip does
        size = self.model.visual.image_size
        self._transform = PilImageTransform(preprocess, size=size[0] if isinstance(size, (tuple, list)) else size,
                                            frames=frames)
        self.modalities = ("image", "video", "text")
        self.name = split_open_clip_name(arch)[0]
        self.pretrained = "random" if random else "" if arch.startswith(("hf-hub:", "local-dir:")) else str(
            tag or pretrained)
        self.source = src.identity

    def transform(self) -> PilImageTransform:
        return self._transform

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "video":
            return mean_of_frames(self.model.encode_image, x)
        return self.model.encode_image(x)

    def text_lengths(self, texts) -> Optional[list[int]]:
        return None if self.trimmed is None else self.trimmed.lengths(self.tokenizer(list(texts)))

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)  # [B, context_length]
        return self.model.encode_text(tokens) if self.trimmed is None else self.trimmed.encode(tokens)
