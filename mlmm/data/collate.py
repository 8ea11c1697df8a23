"""Processed samples -> a :class:`~mlmm.data.batch.Batch`: media stacked (zeros and mask False where a row has none),
text padded to the batch's longest caption, JPEG bytes / waveforms kept for decoding and log-mel on the device
(``data.decode_on_device`` / ``data.logmel_on_device``), ``extras`` arrays stacked, and the rows of each modality
listed on the host."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from mlmm.data.batch import Batch
from mlmm.modalities import MEDIA

BATCH_FIELDS = {f.name for f in dataclasses.fields(Batch)}


def collate(samples: Sequence[dict[str, Any]], *, shapes: Optional[dict[str, tuple[int, ...]]] = None,
            pad_id: int = 0) -> Batch:
    """Stack processed samples into a Batch; absent modalities are zeros with mask False.

    ``shapes`` (e.g. ``Preprocessor.shapes``) gives the per-sample shape of modalities that no
    sample of this batch has, so the model's modalities are always present in the batch.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    shapes, n = dict(shapes or {}), len(samples)
    fields: dict[str, Any] = {}
    for m in MEDIA:
        tensors = [s.get(m) for s in samples]
        encoded = [s.get(f"{m}_jpeg") for s in samples]  # data.decode_on_device: decoded later, on the device
        any_encoded = any(e is not None for e in encoded)
        have = [t is not None or e is not None for t, e in zip(tensors, encoded)]
        waves = [s.get(f"{m}_wave") for s in samples]  # data.logmel_on_device: features made later, on the device
        if any(w is not None for w in waves):
            fields.update(collate_waves(samples, m, tensors, waves))
            continue
        if not any(have) and m not in shapes:
            continue
        shape = next((tuple(t.shape) for t in tensors if t is not None), None) or shapes[m]
        for s, t in zip(samples, tensors):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"collate: {m} of {s['key']} has shape {tuple(t.shape)}, expected {shape}")
        dtype = next((t.dtype for t in tensors if t is not None), torch.uint8 if any_encoded else torch.float32)
        dtype = torch.uint8 if dtype == torch.uint8 else torch.float32  # uint8 images stay uint8 (4x smaller)
        if all(t is not None for t in tensors):  # one pass, no zero fill
            data = torch.stack(tensors).to(dtype)  # [B, *shape]
        else:
            data = torch.zeros((n, *shape), dtype=dtype)  # [B, *shape]
            for i, t in enumerate(tensors):
                if t is not None:
                    data[i] = t
        fields[m], fields[f"{m}_mask"] = data, torch.tensor(have, dtype=torch.bool)
        if any_encoded:
            boxes = [s.get(f"{m}_box") for s in samples]
            fields[f"{m}_jpeg"] = encoded
            fields[f"{m}_box"] = torch.stack([b if b is not None else torch.zeros(4, dtype=torch.long) for b in boxes])
    have = ["text_ids" in s for s in samples]
    if any(have) or "text" in shapes:
        length = max([len(s["text_ids"]) for s in samples if "text_ids" in s] or [shapes["text"][0]])
        ids = torch.full((n, length), pad_id, dtype=torch.long)  # [B, L]
        att = torch.zeros((n, length), dtype=torch.long)  # [B, L]
        for i, s in enumerate(samples):
            if "text_ids" in s:
                ids[i, : len(s["text_ids"])] = s["text_ids"]
                att[i, : len(s["text_attention"])] = s["text_attention"]
        # pad to the batch's longest text (rounded up to a multiple of 8), not to model.text.max_length: the
        # text tower's cost follows the real caption lengths (masked positions change no output)
        longest = int(att.sum(dim=1).max()) if n else 0
        keep = min(length, max(8, -(-longest // 8) * 8))
        ids, att = ids[:, :keep].contiguous(), att[:, :keep].contiguous()  # [B, L'] with L' <= L
        fields.update(text_ids=ids, text_attention=att, text_mask=torch.tensor(have, dtype=torch.bool))
    # which rows carry each modality, built here on the CPU: the model and losses read them without a device sync
    present = {m: tuple(i for i, h in enumerate(fields[f"{m}_mask"].tolist()) if h)
               for m in (*MEDIA, "text") if f"{m}_mask" in fields}
    more = {k: fields.pop(k) for k in list(fields) if k not in BATCH_FIELDS}  # registered beyond the built-ins
    return Batch(keys=[s["key"] for s in samples], lang=[s.get("lang", "") for s in samples],
                 meta=[s.get("meta", {}) for s in samples], captions=[s.get("caption", "") for s in samples],
                 extras=collate_extras(samples), present=present,
                 row_index={m: torch.tensor(rows, dtype=torch.long) for m, rows in present.items()}, more=more,
                 **fields)


def collate_waves(samples: Sequence[dict[str, Any]], m: str, tensors: list, waves: list) -> dict[str, Any]:
    """``data.logmel_on_device``: ``<m>_wave`` Float[B, samples] (zeros for rows without it) and ``<m>_mask``; the
    features ``<m>`` stay None until :meth:`~mlmm.data.batch.Batch.audio_features` computes them."""
    first = next(w for w in waves if w is not None)
    for s, t, w in zip(samples, tensors, waves):
        if t is not None or (w is not None and w.shape != first.shape):
            raise ValueError(f"collate: {m} of {s['key']} is not a waveform of shape {tuple(first.shape)}")
    data = torch.stack([w if w is not None else torch.zeros_like(first) for w in waves])  # [B, samples]
    return {m: None, f"{m}_wave": data, f"{m}_mask": torch.tensor([w is not None for w in waves], dtype=torch.bool)}


def collate_extras(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack each ``extras`` array over the batch: [B, ...] zero-padded along the first dim to the longest,
    zeros for rows without it, plus ``<name>_mask`` Bool[B]."""
    names = sorted({k for s in samples for k in s.get("extras", {})})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        arrays = [s.get("extras", {}).get(name) for s in samples]
        first = next(a for a in arrays if a is not None)
        if any(a is not None and (a.dim() != first.dim() or a.shape[1:] != first.shape[1:]) for a in arrays):
            raise ValueError(f"collate: extras {name!r} have inconsistent shapes "
                             f"{sorted({tuple(a.shape) for a in arrays if a is not None})}")
        lead = max((a.shape[0] for a in arrays if a is not None and a.dim()), default=0)
        shape = (lead, *first.shape[1:]) if first.dim() else ()
        data = torch.zeros((len(samples), *shape), dtype=first.dtype)  # [B, ...]
        for i, a in enumerate(arrays):
            if a is not None and a.dim():
                data[i, : a.shape[0]] = a
            elif a is not None:
                data[i] = a
        out[name] = data
        out[f"{name}_mask"] = torch.tensor([a is not None for a in arrays], dtype=torch.bool)
    return out
