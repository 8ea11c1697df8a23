"""Builders of the towers that need more than their config (the ``build`` of their :mod:`mlmm.modalities` entry):
``build(model_cfg, towers, tokenizer) -> nn.Module`` with ``towers`` = the towers built before it."""
from __future__ import annotations

from torch import nn

from mlmm.models.towers.text import TextTower
from mlmm.models.towers.text_native import NativeTextTower
from mlmm.models.towers.video import VideoTower


def video_tower(cfg, towers: dict[str, nn.Module], tokenizer) -> nn.Module:
    """The video tower; with ``video.share_image_tower`` its frame encoder is the image tower itself."""
    frames = towers["image"] if cfg.video.share_image_tower else None
    return VideoTower(cfg.video, frame_encoder=frames)


def text_tower(cfg, towers: dict[str, nn.Module], tokenizer) -> nn.Module:
    """A transformers encoder (``TextTower``) or, for ``arch: clip`` built from scratch, the native CLIP-style tower;
    sized to the tokenizer's vocabulary (rows of words appended by ``text.extend_vocab`` initialised)."""
    if tokenizer is None:
        raise ValueError("model.text needs a tokenizer (model.text.tokenizer folder)")
    native = cfg.text.arch == "clip" and not cfg.text.pretrained and not cfg.text.hf_config
    text_cls = NativeTextTower if native else TextTower
    tower = text_cls(cfg.text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if cfg.text.pretrained and cfg.text.extend_vocab is not None:  # rows for the appended words
        from mlmm.data.vocab import init_new_embeddings

        init_new_embeddings(tower.model, tokenizer)
    return tower
