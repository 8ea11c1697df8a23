"""Per-row teacher targets for a Batch: stored (precomputed into the shards) or computed online.

Pairing (parallel captions, M-CLIP): a row holds a caption in language L (``batch.lang[b]``,
``batch.captions[b]``) of sample ``batch.meta[b]``; its teacher input is the sample's caption in the
teacher language (``teacher.language``, usually en):

* same language, or both caption lists of equal length (parallel lists): the caption at the same index;
* otherwise the first teacher-language caption (item-level pairing: the captions describe the same item);
* no teacher-language caption: the row has no target (masked out of the loss).

Rows without a caption (an audio-only student reads no text) use caption index 0.

Stored embeddings (``python -m mlmm.distill.precompute``) arrive as ``batch.extras``:
``teacher_text`` [B, K, D] (one row per teacher-language caption, in ``meta["captions"][lang]`` order),
``teacher_image`` [B, D], ``teacher_video`` [B, D], each with ``<name>_mask``; ``meta["teacher"]["id"]``
must equal the teacher's fingerprint. Rows without stored values fall back to the online teacher, so both
paths give the same numbers (tested).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from mlmm.data.batch import Batch
from mlmm.distill.teacher import Teacher


def _as_list(caps: Any) -> list[str]:
    if caps is None:
        return []
    return [caps] if isinstance(caps, str) else list(caps)


def parallel_index(meta: dict, lang: str, caption: str, target_lang: str) -> Optional[int]:
    """Index of the ``target_lang`` caption paired with ``caption`` (in ``lang``) of one sample, or None."""
    caps = meta.get("captions") or {}
    tgt = _as_list(caps.get(target_lang))
    if not tgt:
        return None
    src = _as_list(caps.get(lang)) if lang else []
    if caption and caption in src and (lang == target_lang or len(src) == len(tgt)):
        return src.index(caption)
    return 0


class TeacherTargets:
    """Teacher embeddings for the rows of a batch, from ``batch.extras`` when allowed, else online."""

    def __init__(self, teacher: Teacher, use_stored: bool = True):
        self.teacher, self.use_stored = teacher, use_stored

    def _stored(self, batch: Batch, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.use_stored or name not in batch.extras:
            return None
        mask = batch.extras[f"{name}_mask"].bool()
        for b in torch.nonzero(mask).flatten().tolist():
            tid = (batch.meta[b].get("teacher") or {}).get("id") if b < len(batch.meta) else None
            if tid != self.teacher.fingerprint:
                raise ValueError(f"batch row {batch.keys[b]}: stored {name} was precomputed by teacher {tid!r}, "
                                 f"this run's teacher is {self.teacher.fingerprint!r}; re-run "
                                 f"`python -m mlmm.distill.precompute` or set loss use_stored: false")
        return batch.extras[name], mask

    def text(self, batch: Batch, device: torch.device, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """-> (targets [B, D], valid Bool[B], target caption strings [B] ("" where invalid))."""
        lang_t = self.teacher.cfg.language
        n = len(batch)
        out = torch.zeros(n, self.teacher.dim, device=device, dtype=dtype)
        valid = torch.zeros(n, dtype=torch.bool, device=device)
        texts = [""] * n
        rows: list[tuple[int, int]] = []  # (row, caption index)
        for b in range(n):
            meta = batch.meta[b] if b < len(batch.meta) else {}
            lang = batch.lang[b] if b < len(batch.lang) else ""
            cap = batch.captions[b] if b < len(batch.captions) else ""
            j = parallel_index(meta, lang, cap, lang_t)
            if j is not None:
                rows.append((b, j))
                texts[b] = _as_list(meta["captions"][lang_t])[j]
        stored = self._stored(batch, "teacher_text")
        online = []
        for b, j in rows:
            if stored is not None and bool(stored[1][b]) and j < stored[0].shape[1]:
                out[b] = stored[0][b, j].to(device, dtype)
                valid[b] = True
            else:
                online.append(b)
        if online:
            out[online] = self.teacher.encode_text([texts[b] for b in online], device=device, dtype=dtype)
            valid[online] = True
        return out, valid, texts

    def visual(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher image embedding per row (image, else the mean of its video frames): ([B, D], valid Bool[B])."""
        n = len(batch)
        out = torch.zeros(n, self.teacher.dim, device=device, dtype=dtype)
        valid = torch.zeros(n, dtype=torch.bool, device=device)
        for modality in ("image", "video"):
            stored = self._stored(batch, f"teacher_{modality}")
            if stored is not None:
                take = stored[1].to(device) & ~valid
                out[take] = stored[0].to(device, dtype)[take]
                valid |= take
            data = getattr(batch, modality, None)
            need = batch.mask(modality).to(device) & ~valid
            if data is not None and bool(need.any()) and self.teacher.has_image:
                idx = torch.nonzero(need).flatten()
                x = data[idx].to(device, dtype)
                z = self.teacher.encode_image(x) if modality == "image" else self.teacher.encode_video(x)
                out[idx] = z.to(dtype)
                valid[idx] = True
        return out, valid
