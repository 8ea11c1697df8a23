"""The interface every evaluated model has, whatever library it comes from.

    model = load_model("open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k")   # see mlmm.evaluation.models
    z_img = model.encode_image(pixels)      # [B, E], L2-normalised, float32 on the CPU
    z_txt = model.encode_text(["a dog", "ein Hund"])
    media = model.transform(raw_sample)     # {modality: tensor}: decoding + the library's own preprocessing

``transform`` is a small picklable object without the network: DataLoader workers run it (decode in the workers,
encode in the main process). It raises :class:`~mlmm.data.transforms.SampleError` for anything it cannot decode, so
readers count the sample as a skip.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from mlmm.data.transforms import SampleError
from mlmm.modalities import MEDIA, modality


class MediaTransform:
    """Raw shard sample -> ``{modality: tensor}`` for the modalities it has; subclasses fill :meth:`one`."""

    def __init__(self, modalities: Sequence[str]):
        self.modalities = [m for m in modalities if m in MEDIA]

    def one(self, modality: str, data: bytes) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, raw: dict[str, Any], modalities: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        out = {}
        for m in (modalities or self.modalities):
            data = modality(m).member(raw) if m in self.modalities else None
            if data is None:
                continue
            try:
                out[m] = self.one(m, data)
            except SampleError:
                raise
            except (ValueError, OSError, RuntimeError) as e:  # a library transform refusing the decoded input
                raise SampleError(f"undecodable {m}", f"{raw.get('__key__', '?')}: {e}") from e
        return out


class EvalModel:
    """A model under evaluation: per-modality encoders into one L2-normalised space, plus its tokenizer.

    Subclasses set ``modalities``, ``tokenizer``, ``name`` / ``pretrained`` (the ``model`` / ``pretrained`` keys of
    result rows, as CLIP_benchmark writes them) and implement :meth:`_encode` and :meth:`_encode_text`
    (un-normalised features). ``mlmm`` is the :class:`~mlmm.models.model.MultimodalModel` when the model is an mlmm
    one (its heads serve VQA, captioning and hashing), else None.
    """

    name: str = ""
    pretrained: str = ""
    modalities: tuple[str, ...] = ()
    tokenizer: Any = None
    mlmm: Any = None

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    # ------------------------------------------------------------------ to implement
    def transform(self) -> MediaTransform:
        raise NotImplementedError

    def _encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ the interface
    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"{self.name}: no {modality} encoder (the model has {', '.join(self.modalities)})")

    @torch.no_grad()
    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed media [B, ...] (from :meth:`transform`) -> [B, E] L2-normalised float32 on the CPU."""
        self._check(modality)
        return F.normalize(self._encode(modality, x.to(self.device)).float(), dim=-1).cpu()

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode("image", x)

    def encode_video(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode("video", x)

    def encode_audio(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode("audio", x)

    def text_lengths(self, texts: Sequence[str]) -> Optional[list[int]]:
        """Tokens each string costs, for a text tower that runs every batch at its longest string's length and
        whose embeddings do not depend on that length (e.g. a causal tower pooled at the end of the text, see
        :mod:`mlmm.evaluation.models.text_trim`); None (the default): batches are encoded in the order given."""
        return None

    def text_order(self, texts: Sequence[str]) -> Optional[list[int]]:
        """The order to encode ``texts`` in so that batches are tight (by :meth:`text_lengths`), or None."""
        from mlmm.evaluation.models.text_trim import length_order

        lengths = self.text_lengths(texts)
        return None if lengths is None else length_order(lengths)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Raw strings -> [N, E] L2-normalised float32 on the CPU, ``batch_size`` strings per forward pass (sorted by
        length when :meth:`text_lengths` gives lengths; rows come back in the input's order)."""
        from mlmm.evaluation.models.text_trim import encode_by_length

        self._check("text")
        z = encode_by_length(lambda chunk: F.normalize(self._encode_text(chunk).float(), dim=-1).cpu(), texts,
                             batch_size, self.text_lengths)  # [N, E]
        return torch.empty(0, 0) if z is None else z

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, pretrained={self.pretrained!r}, modalities={self.modalities})"


class PilImageTransform(MediaTransform):
    """Images (and videos as frames) through a library's own PIL image transform ``image_fn(PIL) -> [3, H, W]``.

    Video: ``frames`` frames sampled uniformly over the clip (:func:`mlmm.data.transforms.decode_video`, centre
    square, resized to ``size``), each through ``image_fn`` -> [T, 3, H, W]; image-only models embed them frame by
    frame and average (:func:`mean_of_frames`, the CLIP4Clip "mean pooling" zero-shot baseline).
    """

    def __init__(self, image_fn, *, size: int, frames: int = 8, video: bool = True):
        super().__init__(["image", "video"] if video else ["image"])
        self.image_fn, self.size, self.frames = image_fn, int(size), int(frames)

    def one(self, modality: str, data: bytes) -> torch.Tensor:
        from PIL import Image

        from mlmm.data.transforms import decode_image, decode_video

        if modality == "image":
            return self.image_fn(decode_image(data))
        clip = decode_video(data, self.frames, self.size, normalize=False)  # uint8 [T, 3, S, S]
        return torch.stack([self.image_fn(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in clip])


def mean_of_frames(encode_image, x: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] -> [B, E]: every frame embedded and L2-normalised, then averaged over T."""
    b, t = x.shape[:2]
    z = F.normalize(encode_image(x.flatten(0, 1)).float(), dim=-1)  # [B*T, E]
    return z.view(b, t, -1).mean(dim=1)  # [B, E]
