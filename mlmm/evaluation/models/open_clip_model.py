"""open_clip models as :class:`~mlmm.evaluation.models.base.EvalModel`.

    --model open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k    # a built-in architecture + a pretrained tag or file
    --model open_clip:MyArch,pretrained=ckpt.pt,config=cfgs/   # an architecture from your own config JSON(s)
    --model hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K      # a Hub repo with open_clip_config.json
    --model local-dir:path/to/folder                          # the same, from a local folder

Weights come through open_clip's own loaders (its Hub cache; offline with ``HF_HUB_OFFLINE=1``). Embeddings are
``model.encode_image`` / ``encode_text`` after ``model.eval()`` on the inputs of open_clip's eval ``preprocess`` and
tokenizer; videos are embedded frame by frame and averaged. Random weights are refused: an architecture needs
``pretrained=TAG|FILE`` (``pretrained=random`` to evaluate an untrained network on purpose).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mlmm.evaluation.models.base import EvalModel, PilImageTransform, mean_of_frames


def _weights_present(name: str) -> Optional[str]:
    """Why a schema'd open_clip model would load random weights (open_clip only warns), else None."""
    if name.startswith("local-dir:"):
        from open_clip.factory import _find_checkpoint_in_dir

        folder = Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            return f"{folder}: no open_clip_config.json"
        if _find_checkpoint_in_dir(folder) is None:
            return f"{folder}: no weights file (*.safetensors, *.bin, *.pth)"
    elif name.startswith("hf-hub:"):
        from open_clip.factory import download_pretrained_from_hf

        try:
            download_pretrained_from_hf(name[len("hf-hub:"):])
        except Exception as e:  # noqa: BLE001 - not found / offline and not cached / gated: all "no weights"
            return f"{name}: no open_clip weights could be fetched ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


class OpenClipEvalModel(EvalModel):
    def __init__(self, name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu", *,
                 config: Optional[str] = None, frames: int = 8):
        import open_clip

        super().__init__(device)
        arch = name[len("open_clip:"):] if name.startswith("open_clip:") else name
        schema = arch.startswith(("hf-hub:", "local-dir:"))
        if config:
            open_clip.add_model_config(config)
        if not schema and not pretrained:
            tags = open_clip.list_pretrained_tags_by_model(arch) if arch in open_clip.list_models() else []
            raise ValueError(f"open_clip:{arch}: no pretrained=TAG|FILE (the network would have random weights); "
                             f"open_clip's tags for it: {', '.join(tags) or 'none'}")
        if schema and (problem := _weights_present(arch)):
            raise FileNotFoundError(problem)
        weights = None if (schema or pretrained == "random") else pretrained
        self.model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights,
                                                                          device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self._transform = PilImageTransform(preprocess, size=size[0] if isinstance(size, (tuple, list)) else size,
                                            frames=frames)
        self.modalities = ("image", "video", "text")
        self.name = arch
        self.pretrained = "" if schema else str(pretrained)

    def transform(self) -> PilImageTransform:
        return self._transform

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality == "video":
            return mean_of_frames(self.model.encode_image, x)
        return self.model.encode_image(x)

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device))
