"""The batch that flows from the data pipeline into models and losses.

A batch may mix samples that lack some modality: every modality tensor is present for all B rows
(zeros where the sample has none) together with a boolean presence mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch

from mlmm.modalities import MODALITIES


@dataclass
class Batch:
    keys: list[str]  # sample keys, length B
    image: Optional[torch.Tensor] = None  # [B, 3, H, W] float, normalised (uint8 before normalize_images)
    image_mask: Optional[torch.Tensor] = None  # [B] bool
    video: Optional[torch.Tensor] = None  # [B, T, 3, H, W] float, normalised (uint8 before normalize_images)
    video_mask: Optional[torch.Tensor] = None  # [B] bool
    audio: Optional[torch.Tensor] = None  # [B, 1, n_mels, frames] float log-mel
    audio_mask: Optional[torch.Tensor] = None  # [B] bool
    # data.logmel_on_device: Float32[B, samples] fixed-length waveforms (zeros where no audio); ``audio`` is None
    # until :meth:`audio_features`. Never cast to the compute dtype: the log-mel is computed from float32
    audio_wave: Optional[torch.Tensor] = None
    text_ids: Optional[torch.Tensor] = None  # [B, L] long
    text_attention: Optional[torch.Tensor] = None  # [B, L] long (1 = real token)
    text_mask: Optional[torch.Tensor] = None  # [B] bool
    lang: list[str] = field(default_factory=list)  # language of each row's text ("" when none)
    meta: list[dict] = field(default_factory=list)  # the sample json of each row
    captions: list[str] = field(default_factory=list)  # the caption text of each row ("" when none)
    # arrays stored in the shards as "<name>.npy" (e.g. precomputed teacher embeddings): [B, ...] zero-padded
    # along their first dim to the longest in the batch, plus "<name>_mask" Bool[B] (row has it)
    extras: dict = field(default_factory=dict)
    data_state: Optional[dict] = None  # position of the stream slot that made this batch (resume)
    # data.decode_on_device: per row the JPEG bytes (uint8 [n_bytes] CPU tensor) or None; their crop boxes
    # Long[B, 4]. Those rows of ``image`` are zeros until :meth:`decode_images`
    image_jpeg: list = field(default_factory=list)
    image_box: Optional[torch.Tensor] = None
    # per modality, the rows that carry it, built on the CPU by collate: ``present`` host ints (read without a
    # device sync) and ``row_index`` Long[n_m] tensors that travel with the batch (:meth:`to`, :meth:`pin_memory`)
    present: dict = field(default_factory=dict)
    row_index: dict = field(default_factory=dict)
    # modalities registered beyond the built-in four (mlmm.modalities): "<m>" [B, ...] and "<m>_mask" Bool[B]
    more: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "Batch":
        """Move tensors to `device` (asynchronously from pinned memory); floating tensors are cast to `dtype` when
        given. The host row lists (``present``) are filled in first, from the CPU masks, so that reading them later
        never waits for the device."""
        present = {m: self.rows(m) for m in MODALITIES}
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and f.name != "image_box":  # crop boxes stay on the host (decoder)
                v = v.to(device, non_blocking=True)
                if dtype is not None and v.is_floating_point() and f.name != "audio_wave":
                    v = v.to(dtype)
            elif f.name in ("extras", "row_index", "more"):
                v = {k: t.to(device, dtype, non_blocking=True) if dtype is not None and t.is_floating_point()
                     else t.to(device, non_blocking=True) for k, t in v.items()}
            elif f.name == "present":
                v = present
            out[f.name] = v
        return Batch(**out)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of every tensor (``DataLoader(pin_memory=True)`` calls this in its pinning thread), so
        that :meth:`to` with ``non_blocking=True`` really overlaps the copy with compute."""
        def pin(v):
            if isinstance(v, torch.Tensor):
                return v.pin_memory()
            if isinstance(v, dict):
                return {k: pin(t) for k, t in v.items()}
            if isinstance(v, list):
                return [pin(t) for t in v]
            return v

        return Batch(**{f.name: pin(getattr(self, f.name)) if f.name not in ("keys", "lang", "meta", "captions",
                                                                             "data_state", "present")
                        else getattr(self, f.name) for f in fields(self)})

    def rows(self, modality: str) -> tuple[int, ...]:
        """The rows that carry `modality`, as host ints (from collate: no device read)."""
        if modality in self.present:
            return tuple(self.present[modality])
        mask = self.presence(modality)
        if mask is None:
            return ()
        return tuple(torch.nonzero(mask.cpu()).flatten().tolist())  # a batch not made by collate

    def index(self, modality: str, device: Optional[torch.device] = None) -> torch.Tensor:
        """Long[n] rows that carry `modality`, on `device` (default: where the batch's tensors are); ``numel()`` is
        known on the host."""
        idx = self.row_index.get(modality)
        if idx is None:
            idx = torch.tensor(self.rows(modality), dtype=torch.long)
        return idx if device is None else idx.to(device, non_blocking=True)

    def decode_images(self) -> "Batch":
        """``data.decode_on_device``: decode the rows' JPEG bytes where ``image`` lives (nvJPEG on CUDA) into its
        uint8 rows (crop + antialiased bicubic resize there too); a batch without JPEG bytes is returned as is."""
        rows = [i for i, data in enumerate(self.image_jpeg) if data is not None]
        if not rows:
            return self
        from mlmm.data.transforms import decode_jpegs

        if self.image is None or self.image.dtype != torch.uint8:
            raise ValueError("Batch.decode_images: the JPEG rows need a uint8 image tensor (call it before "
                             "normalize_images)")
        image = self.image.clone()
        decoded = decode_jpegs([self.image_jpeg[i] for i in rows], self.image_box[rows].cpu(), image.shape[-1],
                               image.device)  # [n, 3, S, S]
        image[torch.tensor(rows).to(image.device, non_blocking=True)] = decoded
        return replace(self, image=image, image_jpeg=[], image_box=None)

    def normalize_images(self, dtype: Optional[torch.dtype] = None) -> "Batch":
        """uint8 ``image`` / ``video`` / ``extras`` images (``data.normalize_on_device``) -> CLIP-normalised ``dtype``
        (default float32) where they are, typically on the GPU after :meth:`to`; other tensors are unchanged."""
        from mlmm.data.transforms import normalize_uint8

        dtype = dtype or torch.float32
        def fix(t):  # uint8 [..., 3, H, W]: images and frames (extras: only image-shaped [B, 3, H, W] ones)
            return normalize_uint8(t, dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.uint8 else t

        def media(m):  # rows without the modality stay zeros, as the loader's float batches have them
            t, mask = getattr(self, m), getattr(self, f"{m}_mask")
            out = fix(t)
            if out is not t and mask is not None and len(self.rows(m)) < out.shape[0]:
                out = out.masked_fill(~mask.to(out.device).view(-1, *([1] * (out.dim() - 1))), 0.0)
            return out

        extras = {k: fix(v) if v.dim() == 4 and v.shape[1] == 3 else v for k, v in self.extras.items()}
        return replace(self, image=media("image"), video=media("video"), extras=extras)

    def audio_features(self, cfg, dtype: Optional[torch.dtype] = None) -> "Batch":
        """``data.logmel_on_device``: the log-mel of ``audio_wave`` where it lives (one batched MelSpectrogram, on the
        GPU in GPU runs), as ``audio`` [B, 1, n_mels, frames] of ``dtype`` (default float32) with rows without audio
        zeros, as the loader makes them; ``cfg`` is the model's ``AudioTowerConfig``. No waveforms: returned as is."""
        if self.audio_wave is None:
            return self
        from mlmm.data.transforms import logmel

        feats = logmel(self.audio_wave.float(), sample_rate=cfg.sample_rate, n_mels=cfg.n_mels, n_fft=cfg.n_fft,
                       hop_length=cfg.hop_length).unsqueeze(1)  # [B, samples] -> [B, 1, n_mels, frames]
        if len(self.rows("audio")) < feats.shape[0]:
            feats = feats.masked_fill(~self.audio_mask.to(feats.device).view(-1, 1, 1, 1), 0.0)
        return replace(self, audio=feats.to(dtype or torch.float32), audio_wave=None)

    def has(self, modality: str) -> bool:
        return len(self.rows(modality)) > 0

    def input(self, modality: str) -> Optional[torch.Tensor]:
        """The tower input of ``modality``, [B, ...] (text: the token ids), or None."""
        if modality == "text":
            return self.text_ids
        return getattr(self, modality) if hasattr(self, f"{modality}_mask") else self.more.get(modality)

    def presence(self, modality: str) -> Optional[torch.Tensor]:
        """Bool[B] ``<modality>_mask`` as collate made it, or None when the batch has no such modality."""
        name = f"{modality}_mask"
        return getattr(self, name) if hasattr(self, name) else self.more.get(name)

    def mask(self, modality: str) -> torch.Tensor:
        mask = self.presence(modality)
        if mask is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return mask

    # ------------------------------------------------------------------------- rows of the same sample
    def groups(self, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
        """Long[B]: one id per sample key (crc32, the same on every rank, so gathered ids compare across ranks); rows
        with equal ids are one sample (e.g. once per language) and never each other's negatives. None without keys."""
        if not self.keys:
            return None
        return string_ids(self.keys, device)

    def not_negatives(self, rows: torch.Tensor) -> torch.Tensor:
        """Bool[n, n] over (text row i, media row j) of ``rows``: j's media must not be a negative of i's text.

        That is the case when both rows are the same sample (same key), have an identical caption (equal token ids),
        or when text i is one of the captions of sample j (``meta["captions"]``, any language): e.g. another
        rendering of the same scene, captioned alike, is a positive, not a hard negative. Symmetric in the first two.
        """
        device, n = rows.device, rows.numel()
        excl = torch.zeros((n, n), dtype=torch.bool, device=device)
        if self.keys:
            g = self.groups(device)[rows]
            excl |= g[:, None] == g[None, :]
        if self.text_ids is not None:
            ids = self.text_ids.to(device)[rows]  # [n, L]
            if self.text_attention is not None:
                ids = ids.masked_fill(~self.text_attention.to(device)[rows].bool(), -1)
            excl |= (ids[:, None, :] == ids[None, :, :]).all(-1)
        if self.captions and self.meta:
            r = rows.tolist()
            texts = [self.captions[i] for i in r]
            owned = [caption_set(self.meta[i]) for i in r]
            listed = [[bool(t) and t in own for own in owned] for t in texts]  # [i][j]: text i is a caption of j
            excl |= torch.tensor(listed, dtype=torch.bool).view(n, n).to(device, non_blocking=True)
        return excl


def string_ids(strings: list[str], device: Optional[torch.device] = None) -> torch.Tensor:
    """Stable int64 id per string (crc32): Long[len(strings)]; equal strings, equal ids, on every rank."""
    import zlib

    ids = torch.tensor([zlib.crc32(s.encode("utf-8")) for s in strings], dtype=torch.long)
    return ids if device is None else ids.to(device, non_blocking=True)  # (built on the host: no device sync)


def caption_set(meta: dict) -> set[str]:
    """Every caption of a sample json (``captions``: {lang: str | [str, ...]}), all languages together."""
    caps = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(caps, dict):
        return set()
    return {c for v in caps.values() for c in ([v] if isinstance(v, str) else v) if isinstance(c, str)}
