"""The multimodal model: the towers a config names, each followed by a projection to `embed_dim`.

    model = MultimodalModel(cfg.model, tokenizer)
    out = model(batch)          # {"image": [B, E], "text": [B, E], ...}, L2-normalised
    z = model.encode("audio", log_mel)

Models return features; losses live in :mod:`mlmm.losses`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError, ModelConfig
from mlmm.contracts import token_modalities, writers
from mlmm.data.batch import Batch
from mlmm.modalities import modality as spec_of
from mlmm.registry import HEADS


class MultimodalModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        towers: dict[str, nn.Module] = {}
        for m in cfg.modalities:  # in registration order (mlmm.modalities): video after the image tower it shares
            spec = spec_of(m)
            build = spec.load("build")
            towers[m] = build(cfg, towers, tokenizer) if build is not None else spec.load("tower")(cfg.tower(m))
        self.towers = nn.ModuleDict(towers)
        self.proj = nn.ModuleDict({m: nn.Linear(t.width, cfg.embed_dim, bias=False) for m, t in towers.items()})
        for m, p in self.proj.items():
            if cfg.proj_init == "identity":
                if p.in_features != p.out_features:
                    raise ConfigError(f"model.proj_init: identity needs the {m} tower's width ({p.in_features}) "
                                      f"== model.embed_dim ({p.out_features})")
                nn.init.eye_(p.weight)
            else:
                nn.init.normal_(p.weight, std=p.in_features ** -0.5)
        if cfg.image is not None and cfg.image.pretrained:  # open_clip weights (by tag / Hub id / folder / file)
            from mlmm.hub.pretrained import init_image_tower

            init_image_tower(self, cfg.image.pretrained)
        # what the heads read and write (mlmm.contracts): a head reading what no tower or earlier head writes fails
        # here in one line; the towers whose tokens a head reads return them too
        self.token_modalities = token_modalities(writers(cfg))
        self.heads = nn.ModuleDict({name: HEADS.get(hcfg.name).cls(hcfg, self) for name, hcfg in cfg.heads.items()})
        self.audio_context = cfg.video is not None and cfg.video.audio_context  # audio tokens join the video tower
        if self.audio_context and "audio" not in towers:
            raise ConfigError("model.video.audio_context: needs model.audio (its tokens are the video's context)")
        if self.audio_context and cfg.video.temporal_layers < 1:
            raise ConfigError("model.video.temporal_layers: audio_context needs at least one temporal layer "
                              "(the audio tokens join the frames there)")
        if self.audio_context and cfg.video.audio_width != towers["audio"].width:
            raise ConfigError(f"model.video.audio_width: {cfg.video.audio_width} must equal model.audio.width "
                              f"({towers['audio'].width}), the width of the audio tokens")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every tower (``train.gradient_checkpointing``): HF encoders through their own
        ``gradient_checkpointing_enable``, mlmm's transformer blocks through ``torch.utils.checkpoint``
        (non-reentrant; RNG state preserved, so losses and gradients equal the plain path's)."""
        for m, tower in self.towers.items():
            if not hasattr(tower, "set_grad_checkpointing"):
                raise ValueError(f"train.gradient_checkpointing: the {m} tower ({type(tower).__name__}) has no "
                                 "set_grad_checkpointing")
            tower.set_grad_checkpointing(enable)

    @property
    def widths(self) -> dict[str, int]:
        """Feature width of each tower (before projection)."""
        return {m: t.width for m, t in self.towers.items()}

    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    def _features(self, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor]) -> torch.Tensor:
        if modality == "text":
            return self.towers["text"](x, attention)
        return self.towers[modality](x)

    def encode(self, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor] = None,
               normalize: bool = True) -> torch.Tensor:
        """Embed one modality: [B, ...] -> [B, E] (L2-normalised unless normalize=False)."""
        z = self.proj[modality](self._features(modality, x, attention))
        return F.normalize(z, dim=-1) if normalize else z

    def tokenize_text(self, texts: list[str], device: Optional[torch.device] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw strings -> (ids Long[N, L], attention Long[N, L]) on ``device``, padded to the longest."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.cfg.text.max_length,
                             return_tensors="pt")
        device = device or next(self.parameters()).device
        return tok["input_ids"].to(device), tok["attention_mask"].to(device)

    def encode_text(self, texts: list[str], device: Optional[torch.device] = None) -> torch.Tensor:
        """Tokenise and embed raw strings with the model's tokenizer: -> [N, E]."""
        return self.encode("text", *self.tokenize_text(texts, device))

    def encode_tokens(self, modality: str, x: torch.Tensor, attention: Optional[torch.Tensor] = None,
                      audio_tokens: Optional[torch.Tensor] = None, audio_mask: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (embedding [B, E] L2-normalised, tokens [B, T, D_m], token mask Bool[B, T]).

        Video with ``model.video.audio_context``: ``audio_tokens`` [B, Ta, D_audio] / ``audio_mask`` Bool[B, Ta]
        (the audio tower's tokens of the same clips) join its temporal transformer as context.
        """
        tower = self.towers[modality]
        if modality == "text":
            tokens = tower.forward_tokens(x, attention)
        elif audio_tokens is not None:
            tokens = tower.forward_tokens(x, audio_tokens=audio_tokens, audio_mask=audio_mask)
        else:
            tokens = tower.forward_tokens(x)
        pooled = tower.pool(tokens, attention)
        z = F.normalize(self.proj[modality](pooled), dim=-1)
        token_mask = attention.bool() if attention is not None else torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                                device=tokens.device)
        return z, tokens, token_mask

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Embed every modality the model has, for the rows of `batch` that carry it; then run heads.

        Outputs: ``<m>`` [B, E] (zeros on rows without the modality), plus ``<m>_tokens`` [B, T, D_m] and
        ``<m>_token_mask`` Bool[B, T] for the modalities a head reads, plus whatever the heads return.
        Every tower always runs (on one row when none is present, contributing zero) so that each
        parameter gets a gradient on every rank: ZeRO's gradient hooks expect that.
        With ``model.video.audio_context`` the audio tower runs first and its tokens (masked on rows without
        audio) are the video tower's context.
        """
        out: dict[str, torch.Tensor] = {}
        order = self.modalities
        if self.audio_context:  # audio before video
            order = [m for m in order if m != "video"] + ["video"]
        context: dict[str, torch.Tensor] = {}
        for m in order:
            x = batch.input(m)
            if x is None:
                continue
            attention = batch.text_attention if m == "text" else None
            idx = batch.index(m, x.device)  # Long[n] rows carrying m, built on the CPU by collate (no sync)
            n = idx.numel()
            rows = idx if n else idx.new_zeros(1)  # no row present: run on row 0, keep zero
            ctx = {k: v[rows] for k, v in self._audio_context(context, x).items()} if m == "video" else {}
            att = None if attention is None else attention[rows]
            feeds_video = m == "audio" and self.audio_context
            if m in self.token_modalities or ctx or feeds_video:
                z, tokens, tmask = self.encode_tokens(m, x[rows], att, **ctx)
            else:  # pooled only: towers skip work nobody reads (packed padding, CLS-only last block)
                z, tokens, tmask = self.encode(m, x[rows], att), None, None
            if feeds_video:  # the video tower's context; nothing real on rows without audio
                B, present = x.shape[0], tmask & (n > 0)  # present Bool[n, Ta]
                zeros = tokens.new_zeros((B, *tokens.shape[1:]))  # [B, Ta, Da]
                context["audio_tokens"] = zeros.index_copy(0, rows, tokens)
                context["audio_mask"] = present.new_zeros((B, present.shape[1])).index_copy(0, rows, present)
            results = {m: z * 0.0 if n == 0 else z}
            if m in self.token_modalities:
                if n == 0:
                    tokens, tmask = tokens * 0.0, tmask & False
                results.update({f"{m}_tokens": tokens, f"{m}_token_mask": tmask})
            for k, v in results.items():
                if n == x.shape[0]:
                    out[k] = v
                else:  # scatter the present rows into a [B, ...] tensor of zeros
                    full = v.new_zeros((x.shape[0], *v.shape[1:]))
                    if n:
                        out[k] = full.index_copy(0, idx, v)
                    else:  # keep the (zero) graph so every parameter still gets a gradient
                        out[k] = full + v.sum() * 0 if v.is_floating_point() else full
        for head in self.heads.values():
            out.update(head(out, batch, self))
        return out

    def _audio_context(self, context: dict[str, torch.Tensor], video: torch.Tensor) -> dict[str, torch.Tensor]:
        """The video tower's audio context for the B rows of ``video``: {} without ``model.video.audio_context``;
        one masked zero token per row when the batch has no audio (the projection stays in the graph)."""
        if not self.audio_context:
            return {}
        if context:
            return context
        width = self.towers["audio"].width
        return {"audio_tokens": video.new_zeros((video.shape[0], 1, width)),
                "audio_mask": torch.zeros((video.shape[0], 1), dtype=torch.bool, device=video.device)}
