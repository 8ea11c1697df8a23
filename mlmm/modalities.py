"""One modality spec: everything mlmm knows about a modality, in one entry per modality.

    from mlmm.modalities import MODALITIES, modality
    modality("image").extensions          # ('jpg', 'jpeg', 'png', 'webp'): what the reader and the writer take
    modality("video").eval_tasks          # ('video-text', 'video-text-hashing', 'video-audio')

The config (``model.<name>`` sections), the shard writers (accepted files, the decodability check), the reader
(which member of a sample holds the modality, its decoder, the per-sample shape), the batch, the model (which tower
class is built), evaluation (task and metric names) and the model card read this table. Adding a modality is one
:func:`register` call plus its tower config, tower and decoder (``tests/test_modalities.py`` registers a toy one
and trains a step on it).

The built-in entries name their components as ``"module:attribute"`` strings, resolved on first use
(:meth:`Modality.load`), so that importing this module imports neither torch nor the model code; a registered
modality may pass the objects themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional


@dataclass(frozen=True)
class Modality:
    name: str  # config section model.<name>, model output key, Batch field (text: text_ids), sample key
    code: str  # one letter in task and metric names: t2i, i2t, v2a
    extensions: tuple[str, ...] = ()  # sample members (shard extensions) that hold it; the writer accepts the same
    aliases: Mapping[str, str] = field(default_factory=dict)  # further file suffixes the writer takes -> stored as
    # components: "module:attribute" strings (imported on first use) or the objects themselves
    config: Any = ""  # its tower config dataclass (model.<name>)
    tower: Any = ""  # its tower class, built as ``tower(cfg)`` unless ``build`` is set
    build: Any = ""  # build(model_cfg, towers built so far, tokenizer) -> tower, for towers that need more
    shape: Any = ""  # shape(model_cfg) -> the per-sample tensor shape the reader makes (None without the tower)
    decoder: Any = ""  # decode(preprocessor, data: bytes, rng) -> {name: Tensor[*shape], ...} (reader)
    check: Any = ""  # check(data: bytes) -> None; raises on a file that cannot be used (writer)
    pairs: tuple[str, ...] = ()  # media modalities retrieved against this one in evaluation (video: audio)
    input: str = ""  # what one sample of it is, for docs and model cards

    @property
    def is_media(self) -> bool:
        """Stored as a file in the sample (text comes from the json's captions)."""
        return bool(self.extensions)

    @property
    def batch_field(self) -> str:
        return "text_ids" if self.name == "text" else self.name

    @property
    def text_task(self) -> str:
        """Retrieval against captions, per language (:mod:`mlmm.evaluation.runner`)."""
        return f"{self.name}-text"

    @property
    def hashing_task(self) -> str:
        """Hash-code retrieval against captions (:mod:`mlmm.evaluation.hashing`)."""
        return f"{self.name}-text-hashing"

    def pair_task(self, other: str) -> str:
        """Media-media retrieval, positives = the same sample."""
        return f"{self.name}-{other}"

    @property
    def eval_tasks(self) -> tuple[str, ...]:
        """The task names evaluation records carry for this modality (empty for text)."""
        if not self.is_media:
            return ()
        return (self.text_task, self.hashing_task, *(self.pair_task(p) for p in self.pairs))

    def member(self, raw: Mapping[str, Any]) -> Optional[bytes]:
        """The bytes of this modality in a raw shard sample ``{extension: bytes, ...}`` (its first extension
        present), or None."""
        return next((raw[e] for e in self.extensions if raw.get(e) is not None), None)

    def writer_suffixes(self) -> dict[str, str]:
        """File suffix (``.jpg``) -> the sample member it is stored as (``jpg``): every reader extension, plus the
        aliases."""
        return {**{f".{e}": e for e in self.extensions}, **{f".{s}": e for s, e in self.aliases.items()}}

    def load(self, part: str) -> Optional[Callable[..., Any]]:
        """The component named by ``part`` (``"config"``, ``"tower"``, ``"decoder"``, ...), imported; None if unset."""
        ref = getattr(self, part)
        if not ref:
            return None
        if not isinstance(ref, str):
            return ref
        import importlib

        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, Modality] = {}


def register(spec: Modality) -> Modality:
    """Add a modality (after the built-in ones: a tower may use those built before it). Raises ValueError when the
    name, the code or an extension is taken."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] != spec:
        raise ValueError(f"modality {spec.name!r} is registered twice")
    for other in _REGISTRY.values():
        if other.name == spec.name:
            continue
        if other.code == spec.code:
            raise ValueError(f"modality {spec.name!r}: code {spec.code!r} is {other.name!r}'s")
        taken = set(other.writer_suffixes()) & set(spec.writer_suffixes())
        if taken:
            raise ValueError(f"modality {spec.name!r}: file suffixes {sorted(taken)} are {other.name!r}'s")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a modality registered beyond the built-in ones (tests)."""
    if name in BUILT_IN:
        raise ValueError(f"modality {name!r} is built in")
    _REGISTRY.pop(name, None)


def modality(name: str) -> Modality:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown modality {name!r} (known: {list(_REGISTRY)})") from None


class _Names:
    """The registered modality names, in registration order: a live, read-only tuple-like view (iteration,
    ``in``, ``len``, indexing), so a modality registered later is seen by every module that imported it."""

    def __init__(self, media_only: bool = False):
        self.media_only = media_only

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, s in _REGISTRY.items() if s.is_media or not self.media_only)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, i):
        return self._names()[i]

    def __repr__(self) -> str:
        return repr(self._names())


MODALITIES = _Names()  # every modality: image, video, audio, text (+ registered ones)
MEDIA = _Names(media_only=True)  # the ones stored as files in a sample: image, video, audio (+ registered ones)

_CFG, _TOWERS, _DEC = "mlmm.config", "mlmm.models.towers", "mlmm.data.decoders"
register(Modality(
    "image", "i", ("jpg", "jpeg", "png", "webp"), aliases={"jpeg": "jpg"}, config=f"{_CFG}:ImageTowerConfig",
    tower=f"{_TOWERS}:ImageTower",
    shape=f"{_DEC}:image_shape", decoder=f"{_DEC}:decode_image_sample", check=f"{_DEC}:check_image",
    input="an image [3, S, S], CLIP-normalised"))
register(Modality(
    "video", "v", ("mp4", "avi", "webm", "mkv"), config=f"{_CFG}:VideoTowerConfig", tower=f"{_TOWERS}:VideoTower",
    build=f"{_TOWERS}.build:video_tower", shape=f"{_DEC}:video_shape", decoder=f"{_DEC}:decode_video_sample",
    check=f"{_DEC}:check_video", pairs=("audio",), input="a clip of T frames [T, 3, S, S], CLIP-normalised"))
register(Modality(
    "audio", "a", ("wav", "flac", "ogg"), config=f"{_CFG}:AudioTowerConfig", tower=f"{_TOWERS}:AudioTower",
    shape=f"{_DEC}:audio_shape", decoder=f"{_DEC}:decode_audio_sample", check=f"{_DEC}:check_audio",
    input="a log-mel spectrogram [1, n_mels, frames]"))
register(Modality(
    "text", "t", config=f"{_CFG}:TextTowerConfig", tower=f"{_TOWERS}:TextTower", build=f"{_TOWERS}.build:text_tower",
    shape=f"{_DEC}:text_shape", input="token ids [L] of a caption (the model's tokenizer)"))
BUILT_IN = tuple(_REGISTRY)
