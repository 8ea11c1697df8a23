"""transformers dual encoders (``CLIPModel``, ``SiglipModel``, ``AltCLIPModel``, ... any ``AutoModel`` with
``get_image_features`` / ``get_text_features``) as :class:`~mlmm.evaluation.models.base.EvalModel`.

    --model transformers:openai/clip-vit-base-patch32      # a Hub id, @revision allowed (HF cache; HF_HUB_OFFLINE=1)
    --model transformers:path/to/folder                    # a saved folder (save_pretrained + processor files)
    --model path/to/folder                                 # the same, when config.json has a transformers model_type

Embeddings are ``get_image_features(pixel_values)`` on the folder's ``AutoImageProcessor`` output and
``get_text_features(input_ids, attention_mask)`` on its ``AutoTokenizer`` output (padding to the longest string,
``max_length`` padding for SigLIP models, which were trained that way); videos are embedded frame by frame and
averaged. CLIP's causal text tower gets its strings in batches sorted by length (:meth:`text_lengths`), so that
padding to the longest string is tight; the rows come back in the input's order.
"""
from __future__ import annotations

from typing import Optional

import torch

from mlmm.evaluation.models.base import EvalModel, PilImageTransform, mean_of_frames


def _features(out) -> torch.Tensor:
    """transformers < 5 returns the projected features, >= 5 a ModelOutput whose ``pooler_output`` holds them."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ImageProcessorFn:
    """PIL -> [3, H, W] with a transformers image processor (picklable, for loader workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, img) -> torch.Tensor:
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]


class TransformersEvalModel(EvalModel):
    def __init__(self, name: str, device: str | torch.device = "cpu", *, frames: int = 8):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from mlmm.hub.pretrained import load_hf

        super().__init__(device)
        source = name[len("transformers:"):] if name.startswith("transformers:") else name
        model, info = load_hf(AutoModel.from_pretrained, source, "--model", output_loading_info=True)
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
        if missing:  # transformers would initialise them randomly and only warn
            raise ValueError(f"{source}: weights missing from the checkpoint (left random): {sorted(missing)[:4]}")
        self.model = model.to(self.device).eval()
        kinds = [m for m, fn in (("image", "get_image_features"), ("text", "get_text_features"))
                 if hasattr(self.model, fn)]
        if not kinds:
            raise ValueError(f"{source}: {type(self.model).__name__} has neither get_image_features nor "
                             "get_text_features: not a dual encoder")
        self.modalities = tuple((["image", "video"] if "image" in kinds else []) + (["text"] if "text" in kinds
                                                                                  else []))
        if "text" in kinds:
            self.tokenizer = load_hf(AutoTokenizer.from_pretrained, source, "--model")
        self._transform = None
        if "image" in kinds:
            vision = getattr(self.model.config, "vision_config", self.model.config)
            processor = load_hf(AutoImageProcessor.from_pretrained, source, "--model")
            self._transform = PilImageTransform(ImageProcessorFn(processor),
                                                size=int(getattr(vision, "image_size", 224)), frames=frames)
        text = getattr(self.model.config, "text_config", None)
        self.max_length = int(getattr(text, "max_position_embeddings", 0) or 0) or None
        self.padding = "max_length" if str(self.model.config.model_type).startswith("siglip") else True
        self.name, self.pretrained = source, ""

    def transform(self) -> PilImageTransform:
        if self._transform is None:
            raise ValueError(f"{self.name}: no image encoder, nothing to preprocess")
        return self._transform

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=x))

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return mean_of_frames(self._image, x) if modality == "video" else self._image(x)

    def text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The tokenizer call whose output goes to ``get_text_features`` (exposed for tests and users)."""
        tok = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def text_lengths(self, texts) -> Optional[list[int]]:
        """CLIP's text tower is causal and read at one position: each string's token count when that position lies
        inside every string's own tokens (padding to a batch's longest string then changes no embedding); None for
        other models (SigLIP pads to max_length, bidirectional towers are left in the order given)."""
        if self.model.config.model_type != "clip" or self.padding is not True or self.tokenizer.padding_side != "right":
            return None
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        text = getattr(self.model, "text_model", None)  # the module that pools holds the eos id it pools at
        eos = getattr(text, "eos_token_id", self.model.config.text_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        if eos == 2:  # transformers' legacy rule: the first largest id, which a larger pad id would move into the pad
            inside = all(pad is None or not row or pad <= max(row) for row in ids)
        else:  # the first eos id: the string's own, or position 0 when neither the string nor the padding has one
            inside = all(eos in row or pad != eos for row in ids)
        return [len(row) for row in ids] if inside else None

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        return _features(self.model.get_text_features(**self.text_inputs(texts)))
