"""Per-modality sample decoders, shapes and write-time checks: the ``decoder``, ``shape`` and ``check`` of the
built-in :mod:`mlmm.modalities` entries.

* ``<m>_shape(model_cfg)``: the per-sample tensor the reader makes for the model's tower (None without the tower);
* ``decode_<m>_sample(pre, data, rng)``: one sample member's bytes -> ``{name: tensor}`` for the
  :class:`~mlmm.data.preprocess.Preprocessor` ``pre`` (its ``shapes``, ``train``, ``normalize``, ``encoded``, ``cfg``);
  a ValueError means the file does not decode (the reader counts it as a skipped sample);
* ``check_<m>(data)``: a cheap decodability check the shard writers run; raises on a file that cannot be used.
"""
from __future__ import annotations

import io
import random
from typing import Optional

import torch

from mlmm.data.transforms import (audio_to_logmel, crop_box, decode_audio, decode_image, decode_video, fit_waveform,
                                  image_to_tensor, jpeg_size)


# ------------------------------------------------------------------------------------------ shapes
def image_shape(cfg) -> Optional[tuple[int, ...]]:
    return None if cfg.image is None else (3, cfg.image.image_size, cfg.image.image_size)


def video_shape(cfg) -> Optional[tuple[int, ...]]:
    if cfg.video is None:
        return None
    enc = cfg.image if cfg.video.share_image_tower else cfg.video.frame_encoder
    if enc is None:
        raise ValueError("Preprocessor: model.video needs model.image or model.video.frame_encoder")
    return (cfg.video.frames, 3, enc.image_size, enc.image_size)


def audio_shape(cfg) -> Optional[tuple[int, ...]]:
    return None if cfg.audio is None else (1, cfg.audio.n_mels, cfg.audio.frames)


def text_shape(cfg) -> Optional[tuple[int, ...]]:
    return None if cfg.text is None else (cfg.text.max_length,)


# ------------------------------------------------------------------------------------------ decoders
def decode_image_sample(pre, data: bytes, rng: Optional[random.Random]) -> dict[str, torch.Tensor]:
    """-> ``image`` Float[3, S, S] (uint8 with ``data.normalize_on_device``), or with ``data.decode_on_device`` for
    RGB / greyscale JPEGs ``image_jpeg`` (the bytes, uint8 [n_bytes]) + ``image_box`` Long[4] (the crop box)."""
    if pre.encoded and (wh := jpeg_size(data)) is not None:
        return {"image_jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "image_box": torch.tensor(crop_box(*wh, pre.train, rng), dtype=torch.long)}
    size = pre.shapes["image"][-1]
    return {"image": image_to_tensor(decode_image(data, draft_size=size), size, pre.train, rng,
                                     normalize=pre.normalize)}


def decode_video_sample(pre, data: bytes, rng: Optional[random.Random]) -> dict[str, torch.Tensor]:
    """-> ``video`` Float[T, 3, S, S] (uint8 with ``data.normalize_on_device``)."""
    frames, _, _, size = pre.shapes["video"]
    return {"video": decode_video(data, frames, size, train=pre.train, rng=rng, normalize=pre.normalize)}


def decode_audio_sample(pre, data: bytes, rng: Optional[random.Random]) -> dict[str, torch.Tensor]:
    """-> ``audio`` Float[1, n_mels, frames] (log-mel of the centre ``seconds``, zero-padded), or with
    ``data.logmel_on_device`` ``audio_wave`` Float[samples] (the waveform the log-mel would be computed from)."""
    a = pre.cfg.audio
    wave, sr = decode_audio(data)
    if pre.audio_waves:
        return {"audio_wave": fit_waveform(wave, sr, sample_rate=a.sample_rate, seconds=a.seconds)}
    return {"audio": audio_to_logmel(wave, sr, sample_rate=a.sample_rate, seconds=a.seconds, n_mels=a.n_mels,
                                     n_fft=a.n_fft, hop_length=a.hop_length)}


# ------------------------------------------------------------------------------------------ write-time checks
def check_image(data: bytes) -> None:
    from PIL import Image

    Image.open(io.BytesIO(data)).verify()


def check_video(data: bytes) -> None:
    import av

    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")


def check_audio(data: bytes) -> None:
    import soundfile as sf

    info = sf.info(io.BytesIO(data))
    if info.frames <= 0:
        raise ValueError("no audio frames")
