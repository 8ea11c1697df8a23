"""Raw samples -> model inputs: decode, transform and tokenize one sample (:class:`Preprocessor`, with the language
policy and the schema checks), batches of them through :meth:`Preprocessor.collate`
(:func:`mlmm.data.collate.collate`), and every item of an evaluation set (:func:`load_eval_items`). The training stream around it is :mod:`mlmm.data.train_stream`.

A sample that breaks the schema or does not decode raises :class:`~mlmm.data.transforms.SampleError` (its
``reason`` is what the readers count); a caption longer than :data:`CAPTION_CHARS_PER_TOKEN` x
``model.text.max_length`` characters is cut to that length before tokenising and counted (``caption truncated``).
"""
from __future__ import annotations

import collections
import logging
import random
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from mlmm.config import ModelConfig
from mlmm.data.batch import Batch
from mlmm.data.collate import collate
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.data.transforms import SampleError, decode_image, image_to_tensor
from mlmm.data.write_shards import CaptionError, normalise_captions
from mlmm.modalities import MEDIA, MODALITIES, modality

log = logging.getLogger(__name__)

POLICIES = ("random_language", "all_languages", "fixed")
CAPTION_CHARS_PER_TOKEN = 32  # captions are cut to this many characters per model.text.max_length token


def known_extensions() -> set[str]:
    """The sample members the reader knows: ``json`` and every media modality's extensions (:mod:`mlmm.modalities`),
    besides ``<name>.npy`` and ``<name>.<image extension>``."""
    return {"json", *(e for m in MEDIA for e in modality(m).extensions)}


def unknown_extension(raw: dict[str, Any]) -> Optional[str]:
    """The first member extension of a raw sample that the reader does not know (None when all are known)."""
    known = known_extensions()
    for ext in raw:
        if not isinstance(ext, str) or ext.startswith("__") or ext in known or ext.endswith(".npy"):
            continue
        name, _, suffix = ext.rpartition(".")
        if not (name and suffix in modality("image").extensions):  # extra images: "<name>.jpg", ...
            return ext
    return None


def select_captions(
    captions: dict[str, Any], rng: random.Random, policy: str = "random_language", languages: Optional[Sequence[str]] = None
) -> list[tuple[str, str]]:
    """Pick ``(lang, caption)`` pairs per the language policy; ``[]`` when no usable caption.

    ``random_language``/``fixed``: one language uniformly among the sample's languages (within
    ``languages`` when set; ``fixed`` requires it), one of its captions at random.
    ``all_languages``: one random caption for every usable language.
    """
    if policy not in POLICIES:
        raise ValueError(f"language_policy must be one of {POLICIES}, got {policy!r}")
    if policy == "fixed" and not languages:
        raise ValueError("language_policy 'fixed' needs a list of languages")
    norm = {lang: [caps] if isinstance(caps, str) else list(caps) for lang, caps in (captions or {}).items()}
    langs = sorted(lang for lang, caps in norm.items() if caps and (not languages or lang in languages))
    if not langs:
        return []
    if policy == "all_languages":
        return [(lang, rng.choice(norm[lang])) for lang in langs]
    lang = rng.choice(langs)
    return [(lang, rng.choice(norm[lang]))]


class Preprocessor:
    """Turns raw samples into per-modality tensors for the towers a :class:`ModelConfig` has.

    Output sample dicts hold ``key``, ``lang`` ("" when no text), ``meta`` (the sample json) and,
    when present: ``image`` [3,S,S], ``video`` [T,3,S,S], ``audio`` [1,n_mels,frames], ``caption``,
    ``text_ids`` [L], ``text_attention`` [L]. Modalities the model lacks are not decoded.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer: Any = None, *, train: bool,
                 extra_shapes: Optional[dict[str, tuple[int, ...]]] = None, uint8_images: bool = False,
                 encoded_images: bool = False, audio_waves: bool = False):
        """``extra_shapes``: media the model has no tower for but a loss reads (e.g. images for a frozen
        distillation teacher), ``{"image": (3, S, S), "video": (T, 3, S, S)}``; they are decoded at that size.
        ``uint8_images``: images and video frames stay uint8 (``data.normalize_on_device``; the trainer normalises
        them on the device with :meth:`~mlmm.data.batch.Batch.normalize_images`).
        ``encoded_images`` (``data.decode_on_device``, implies ``uint8_images``): RGB / greyscale JPEG images are not
        decoded here; a sample carries ``image_jpeg`` (the bytes) and ``image_box`` (its crop box, read from the
        header) for :meth:`~mlmm.data.batch.Batch.decode_images` on the device. Other images decode here.
        ``audio_waves`` (``data.logmel_on_device``): audio samples carry ``audio_wave``, the fixed-length waveform
        (resampled, cropped / padded), for :meth:`~mlmm.data.batch.Batch.audio_features` on the device."""
        self.cfg, self.tokenizer, self.train = model_cfg, tokenizer, train
        self.normalize, self.encoded = not (uint8_images or encoded_images), encoded_images
        self.audio_waves = audio_waves
        self.modalities = list(model_cfg.modalities)
        if "text" in self.modalities and tokenizer is None:
            raise ValueError("Preprocessor: the model has a text tower, so a tokenizer is required")
        self.shapes: dict[str, tuple[int, ...]] = {}  # per modality of the model, one sample's tensor shape
        for m in MODALITIES:
            shape = modality(m).load("shape")(model_cfg) if model_cfg.tower(m) is not None else None
            if shape is not None:
                self.shapes[m] = tuple(shape)
        for m, shape in (extra_shapes or {}).items():
            if m not in ("image", "video"):
                raise ValueError(f"Preprocessor: extra_shapes supports image/video, got {m!r}")
            self.shapes.setdefault(m, tuple(shape))
        self.pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self.max_caption_chars = CAPTION_CHARS_PER_TOKEN * self.shapes["text"][0] if "text" in self.shapes else None

    def check(self, raw: dict[str, Any], text_field: str = "captions") -> dict[str, list[str]]:
        """Raise :class:`SampleError` for a sample whose json is broken (``bad json``: not UTF-8, not JSON, not an
        object), that holds a member the reader does not know (``unknown extension``), or whose ``captions`` /
        ``text_field`` break the schema (``bad captions``, ``unknown language code``, ``empty captions``: see
        :func:`mlmm.data.write_shards.normalise_captions`); else return ``text_field`` as ``{lang: [str, ...]}``
        (stripped, blank strings dropped)."""
        key, meta = raw.get("__key__", "?"), raw.get("json", {})
        if not isinstance(meta, dict):
            raise SampleError("bad json", f"{key}: json is a {type(meta).__name__}, not an object")
        if "__error__" in meta:
            raise SampleError("bad json", f"{key}: {meta['__error__']}")
        ext = unknown_extension(raw)
        if ext is not None:
            raise SampleError("unknown extension", f"{key}: .{ext} (known: {sorted(known_extensions())}, <name>.npy, "
                                                   "<name>.<image extension>)")
        try:
            text = normalise_captions(meta.get(text_field), key)
            if text_field != "captions":
                normalise_captions(meta.get("captions"), key)
        except CaptionError as e:
            raise SampleError(e.reason, str(e)) from None
        return text

    def cut_caption(self, caption: str, notes: Optional[collections.Counter] = None) -> str:
        """``caption`` cut to ``max_caption_chars`` (counted in ``notes["caption truncated"]``, logged once)."""
        if self.max_caption_chars is None or len(caption) <= self.max_caption_chars:
            return caption
        if notes is not None:
            if not notes["caption truncated"]:
                log.warning("caption of %d characters cut to %d (%d per model.text.max_length token) before "
                            "tokenising; further ones are only counted", len(caption), self.max_caption_chars,
                            CAPTION_CHARS_PER_TOKEN)
            notes["caption truncated"] += 1
        return caption[: self.max_caption_chars]

    def media(self, raw: dict[str, Any], rng: Optional[random.Random] = None) -> dict[str, torch.Tensor]:
        """Decode and transform every media modality that both the sample and the model have."""
        key, out = raw.get("__key__", "?"), {}
        for m in (m for m in MEDIA if m in self.shapes):
            spec = modality(m)
            data = spec.member(raw)
            if data is None:
                continue
            try:
                out.update(spec.load("decoder")(self, data, rng))
            except SampleError as e:
                raise SampleError(e.reason, f"{key}: {e.detail}") from e
            except Exception as e:  # noqa: BLE001 - a transform failing on what the decoder gave: unusable sample
                raise SampleError(f"undecodable {m}", f"{key}: {type(e).__name__}: {e}") from e
        return out

    def extra_images(self, raw: dict[str, Any], rng: Optional[random.Random] = None) -> dict[str, torch.Tensor]:
        """Further images of a sample stored as ``<name>.jpg|png|...`` (e.g. ``ref.jpg``: the reference image of a
        composed-retrieval triplet) -> ``{name: Float[3, S, S]}``, transformed as the main image; they reach the
        batch as ``extras[name]``. Only decoded when the model has an image tower."""
        if "image" not in self.shapes:
            return {}
        out, size = {}, self.shapes["image"][-1]
        for ext, data in raw.items():
            name, _, suffix = ext.rpartition(".") if isinstance(ext, str) else ("", "", "")
            if not name or name.startswith("__") or suffix not in modality("image").extensions or data is None:
                continue
            try:
                out[name] = image_to_tensor(decode_image(data, draft_size=size), size, self.train, rng,
                                            normalize=self.normalize)
            except SampleError as e:
                raise SampleError(e.reason, f"{raw.get('__key__', '?')}.{ext}: {e.detail}") from e
        return out

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids Long[N, L], attention Long[N, L]) padded/truncated to model.text.max_length."""
        if self.tokenizer is None or "text" not in self.shapes:
            raise ValueError("Preprocessor.tokenize: the model has no text tower / tokenizer")
        enc = self.tokenizer(list(texts), max_length=self.shapes["text"][0], padding="max_length",
                             truncation=True, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def __call__(
        self, raw: dict[str, Any], rng: Optional[random.Random] = None, *,
        language_policy: str = "random_language", languages: Optional[Sequence[str]] = None,
        text_field: str = "captions", tokenize: bool = True, notes: Optional[collections.Counter] = None,
    ) -> list[dict[str, Any]]:
        """One raw sample -> one processed sample (``all_languages``: one per language).

        ``tokenize=False``: samples carry their ``caption`` only; :meth:`collate` tokenises a batch's captions in one
        tokenizer call (about 2.5x cheaper per caption than one call each). Over-long captions are cut
        (:meth:`cut_caption`) and counted in ``notes``.

        Raises :class:`SampleError` when the sample breaks the schema (:meth:`check`), a file does not decode or
        nothing the model uses is left.
        """
        rng = rng or random.Random(0)
        key, meta = raw.get("__key__", "?"), raw.get("json") or {}
        text = self.check(raw, text_field)
        media = self.media(raw, rng)
        choices = select_captions(text, rng, language_policy, languages) if "text" in self.shapes else []
        choices = [(lang, self.cut_caption(cap, notes)) for lang, cap in choices]
        if not media and not choices:
            raise SampleError("nothing the model uses", f"{key}: no {'/'.join(self.modalities)} in the sample")
        base = {"key": key, "meta": meta, "lang": "", **media}
        extras = {**decode_extras(raw), **self.extra_images(raw, rng)}
        if extras:
            base["extras"] = extras
        if not choices:
            return [base]
        if not tokenize:
            return [{**base, "lang": lang, "caption": cap} for lang, cap in choices]
        ids, att = self.tokenize([cap for _, cap in choices])  # [n, L]
        return [{**base, "lang": lang, "caption": cap, "text_ids": ids[i], "text_attention": att[i]}
                for i, (lang, cap) in enumerate(choices)]

    def collate(self, samples: Sequence[dict[str, Any]]) -> Batch:
        """Stack samples (:func:`mlmm.data.collate.collate`); captions not tokenised yet (``tokenize=False``) are, in one call."""
        todo = [i for i, s in enumerate(samples) if "caption" in s and "text_ids" not in s]
        if todo:
            ids, att = self.tokenize([samples[i]["caption"] for i in todo])  # [n, L]
            samples = list(samples)
            for j, i in enumerate(todo):
                samples[i] = {**samples[i], "text_ids": ids[j], "text_attention": att[j]}
        return collate(samples, shapes=self.shapes, pad_id=self.pad_id)


def decode_extras(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Arrays stored as ``<name>.npy`` in a sample (e.g. precomputed teacher embeddings) -> {name: tensor}."""
    import io

    import numpy as np

    out = {}
    for ext, data in raw.items():
        if isinstance(ext, str) and ext.endswith(".npy") and data is not None:
            try:
                out[ext[: -len(".npy")]] = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
            except ValueError as e:
                raise SampleError("undecodable npy", f"{raw.get('__key__', '?')}.{ext}: {e}") from e
    return out


# ------------------------------------------------------------------------------------------ eval
def load_eval_items(shards_spec: str | Sequence[str], preprocessor: Preprocessor, modalities: Sequence[str],
                    languages: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Every sample having one of ``modalities`` (media), in shard order, for retrieval evaluation.

    Returns ``{"keys": [item keys], "meta": [item json], "captions": {lang: [(item_index, caption), ...]},
    "skipped": {reason: count}, "notes": {"caption truncated": count}, <modality>: {"data": Float[N_m, ...],
    "items": Long[N_m], "keys": [...]}}`` where ``items`` indexes ``keys``. Every caption of every item is listed
    (restricted to ``languages`` when given; over-long ones cut as in training). Samples that break the schema or do
    not decode, and the unreadable rest of a corrupt shard, are skipped and counted per reason in ``skipped`` (each
    reason logged once). Use a ``Preprocessor(train=False)``.
    """
    unknown = [m for m in modalities if m not in MEDIA or m not in preprocessor.shapes]
    if unknown:
        raise ValueError(f"load_eval_items: modalities {unknown} are not media modalities of the model "
                         f"(model has {sorted(preprocessor.shapes)})")
    shards = resolve_shards(shards_spec) if isinstance(shards_spec, str) else list(shards_spec)
    keys: list[str] = []
    metas: list[dict] = []
    tensors: dict[str, list[torch.Tensor]] = {m: [] for m in modalities}
    items: dict[str, list[int]] = {m: [] for m in modalities}
    captions: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    skipped: collections.Counter[str] = collections.Counter()
    notes: collections.Counter[str] = collections.Counter()
    for raw in tqdm(iter_samples(shards, errors="yield"), desc="eval items", leave=False):
        try:
            if "__error__" in raw:  # the unreadable rest of a shard
                reason, _, detail = raw["__error__"].partition(": ")
                raise SampleError(reason, detail)
            text = preprocessor.check(raw)
            if all(modality(m).member(raw) is None for m in modalities):
                skipped[f"no {'/'.join(modalities)}"] += 1
                continue
            media = preprocessor.media(raw)
        except SampleError as e:
            if not skipped[e.reason]:
                log.warning("eval: skipping %s (further ones with this reason are only counted)", e)
            skipped[e.reason] += 1
            continue
        index = len(keys)
        keys.append(raw["__key__"])
        metas.append(raw["json"])
        for m in modalities:
            if m in media:
                tensors[m].append(media[m])
                items[m].append(index)
        for lang, caps in sorted(text.items()):
            if languages is None or lang in languages:
                captions[lang].extend((index, preprocessor.cut_caption(c, notes)) for c in caps)
    out: dict[str, Any] = {"keys": keys, "meta": metas, "captions": dict(captions), "skipped": dict(skipped),
                           "notes": dict(notes)}
    for m in modalities:
        if tensors[m]:
            out[m] = {"data": torch.stack(tensors[m]), "items": torch.tensor(items[m], dtype=torch.long),
                      "keys": [keys[i] for i in items[m]]}
    return out

