"""CMMAE head: cross-modal mixer + masked autoencoder over video and audio (fuse-then-separate).

    model:
      heads:
        cmmae: {name: cmmae, mask_ratio: 0.75, audio_mask_ratio: 0.5, mixer_layers: 1, decoder_layers: 1}

For the rows that have both a video and an audio clip:

1. **mask** — each video frame keeps ``round((1 - mask_ratio) * patches_per_frame)`` random patches
   (the same count in every frame so frames batch together), the spectrogram keeps
   ``round((1 - audio_mask_ratio) * patches)``;
2. **encode the visible patches only** with the model's own towers (the video tower's frame
   encoder — the image ViT — per frame, plus the video tower's temporal embedding of the frame; the
   audio ViT), exactly as their ``forward_tokens`` would but on a subset of patches, so the
   pretrained encoder is the retriever's encoder and no masked patch leaks into the encoder;
3. **mix** the two visible sequences with :class:`~mlmm.models.fusion.mixer.CrossModalMixer`
   (shared transformer over the concatenation, modality embeddings) and **separate** them;
4. **decode** each modality with its own small MAE decoder (mask tokens at the masked positions +
   learned positional embeddings) to the pixel / log-mel patches;
5. **match**: a classifier on the mixed (video, audio) pooled tokens scores the true pairs and
   shuffled pairs (each video with the next row's audio).

Outputs (the ``cmmae`` loss turns them into the MSE on normalised masked patches + matching BCE):
``cmmae_{video,audio}_pred`` / ``_target`` [n, N, patch_dim], ``cmmae_{video,audio}_mask`` Bool[n, N]
(True = masked = reconstructed), ``cmmae_match_logits`` / ``cmmae_match_labels`` [2n],
``cmmae_weight`` [n] (0 on the placeholder row used when the batch has no video+audio row).

The towers are called submodule by submodule, so ZeRO stage 3 (which gathers a module's parameters
only around its own ``forward``) is not supported for this head: use ``train.zero_stage`` <= 2.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.models.fusion.mixer import CrossModalMixer
from mlmm.models.layers import Transformer
from mlmm.registry import HEADS


@dataclass
class CMMAEHeadConfig:
    mask_ratio: float = 0.75  # fraction of video patches masked (per frame)
    audio_mask_ratio: Optional[float] = None  # fraction of spectrogram patches masked (None = mask_ratio)
    mixer_width: int = 32
    mixer_layers: int = 1
    mixer_heads: int = 2
    decoder_width: int = 32
    decoder_layers: int = 1
    decoder_heads: int = 2
    RANGES: ClassVar[dict] = {"mask_ratio": "[0, 1)", "audio_mask_ratio": "[0, 1)", "mixer_width": ">= 1",
                              "mixer_layers": ">= 1", "mixer_heads": ">= 1", "decoder_width": ">= 1",
                              "decoder_layers": ">= 1", "decoder_heads": ">= 1"}
    name: str = field(default="cmmae", init=False)

    def validate(self, where: str) -> None:
        for w, h in (("mixer_width", "mixer_heads"), ("decoder_width", "decoder_heads")):
            if getattr(self, w) % getattr(self, h):
                raise ConfigError(f"{where}.{h}: {getattr(self, h)} does not divide {w} {getattr(self, w)}")


# --------------------------------------------------------------------------------- helpers
def random_masking(n: int, length: int, keep: int, device=None, generator: Optional[torch.Generator] = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-row random masking: (keep_idx Long[n, keep] sorted ascending, mask Bool[n, length] True = masked)."""
    noise = torch.rand(n, length, device=device, generator=generator)
    keep_idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # [n, keep]
    mask = torch.ones(n, length, dtype=torch.bool, device=device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)*(W/p), C*p*p], patches in the order of ``conv1(x).flatten(2)`` (row-major)."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [N, gh, gw, C, p, p]
    return x.reshape(N, (H // p) * (W // p), C * p * p)


def encode_visible(vit: nn.Module, x: torch.Tensor, keep_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """A ViT (``mlmm.models.towers.image.ViT``) on the kept patches only: x [N, C, H, W] -> [N, 1 + K, D] (CLS first).

    With ``keep_idx`` None (every patch) this equals ``vit.forward_tokens(x)``.
    """
    p = vit.conv1(x).flatten(2).transpose(1, 2)  # [N, Np, D]
    pos = vit.positional_embedding.to(p.dtype)
    p = p + pos[1:]
    if keep_idx is not None:
        p = torch.gather(p, 1, keep_idx[..., None].expand(-1, -1, p.shape[-1]))  # [N, K, D]
    cls = (vit.class_embedding.to(p.dtype) + pos[0]).expand(p.shape[0], 1, -1)  # [N, 1, D]
    return vit.ln_post(vit.transformer(vit.ln_pre(torch.cat([cls, p], dim=1))))


class MAEDecoder(nn.Module):
    """Visible tokens [n, K, D_in] at positions keep_idx [n, K] -> predictions for every position [n, N, out_dim]."""

    def __init__(self, in_width: int, width: int, layers: int, heads: int, length: int, out_dim: int):
        super().__init__()
        self.embed = nn.Linear(in_width, width)
        self.mask_token = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(0.02 * torch.randn(length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, visible: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        n, K = keep_idx.shape
        v = self.embed(visible)  # [n, K, W]
        full = self.mask_token.to(v.dtype).expand(n, self.pos.shape[0], -1).clone()  # [n, N, W]
        full = full.scatter(1, keep_idx[..., None].expand(-1, -1, v.shape[-1]), v)
        return self.head(self.ln(self.transformer(full + self.pos.to(v.dtype))))


@HEADS.register("cmmae", config=CMMAEHeadConfig)
class CMMAEHead(nn.Module):
    @staticmethod
    def reads(cfg: CMMAEHeadConfig, model) -> set[str]:
        return {"video", "audio"}  # the two towers (it encodes the batch's visible patches with them)

    @staticmethod
    def writes(cfg: CMMAEHeadConfig, model) -> set[str]:
        return {"cmmae_video_pred", "cmmae_video_target", "cmmae_video_mask", "cmmae_audio_pred",
                "cmmae_audio_target", "cmmae_audio_mask", "cmmae_match_logits", "cmmae_match_labels", "cmmae_weight"}

    def __init__(self, cfg: CMMAEHeadConfig, model):
        super().__init__()
        self.cfg = cfg
        video, audio = model.towers["video"], model.towers["audio"]
        vit = video.encoder
        self.frames, self.vp = video.cfg.frames, vit.patch_size
        self.v_per_frame = vit.grid[0] * vit.grid[1]
        self.ap, self.a_len = audio.patch_size, audio.grid[0] * audio.grid[1]
        a_ratio = cfg.mask_ratio if cfg.audio_mask_ratio is None else cfg.audio_mask_ratio
        self.v_keep = max(1, round((1 - cfg.mask_ratio) * self.v_per_frame))
        self.a_keep = max(1, round((1 - a_ratio) * self.a_len))
        W = cfg.mixer_width
        self.video_in, self.audio_in = nn.Linear(video.width, W), nn.Linear(audio.width, W)
        self.mixer = CrossModalMixer(W, cfg.mixer_layers, cfg.mixer_heads, ("video", "audio"))
        self.video_decoder = MAEDecoder(W, cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads,
                                        self.frames * self.v_per_frame, 3 * self.vp ** 2)
        self.audio_decoder = MAEDecoder(W, cfg.decoder_width, cfg.decoder_layers, cfg.decoder_heads,
                                        self.a_len, self.ap ** 2)
        self.match = nn.Sequential(nn.LayerNorm(2 * W), nn.Linear(2 * W, W), nn.GELU(), nn.Linear(W, 1))

    # ----------------------------------------------------------------------------- encoders
    def encode_video(self, tower: nn.Module, video: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """The video tower, video [n, T, 3, H, W], keep_idx [n*T, K] (per frame) -> visible tokens [n, T*K, D_v]
        (frame-major)."""
        n, T = video.shape[:2]
        tok = encode_visible(tower.encoder, video.flatten(0, 1), keep_idx)[:, 1:]  # [n*T, K, D] (CLS dropped)
        tok = tok.view(n, T, -1, tok.shape[-1]) + tower.temporal_embedding[:T, None, :].to(tok.dtype)
        return tok.flatten(1, 2)

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch, model) -> dict[str, torch.Tensor]:
        video_tower, audio_tower = model.towers["video"], model.towers["audio"]
        device = batch.video.device
        valid = batch.mask("video").to(device) & batch.mask("audio").to(device)
        rows = torch.nonzero(valid).squeeze(1)
        weight = torch.ones(rows.numel(), device=device)
        if rows.numel() == 0:  # placeholder row, weight 0: keeps a graph through every parameter (ZeRO)
            rows, weight = torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, device=device)
        n = rows.numel()
        dtype = next(self.parameters()).dtype
        video = batch.video[rows].to(dtype)  # [n, T, 3, H, W]
        audio = audio_tower.prepare(batch.audio[rows].to(dtype))  # the tower's log-mel crop / pad: [n, 1, M, F]
        T = video.shape[1]

        # 1. mask (video: per frame, same keep count in every frame; audio: over all patches)
        v_keep, v_mask = random_masking(n * T, self.v_per_frame, self.v_keep, device)
        a_keep, a_mask = random_masking(n, self.a_len, self.a_keep, device)
        # 2. encode visible patches with the towers
        v_tok = self.video_in(self.encode_video(video_tower, video, v_keep))  # [n, T*Kv, W]
        a_tok = self.audio_in(encode_visible(audio_tower, audio, a_keep)[:, 1:])  # [n, Ka, W]
        ones_v = torch.ones(v_tok.shape[:2], dtype=torch.bool, device=device)
        ones_a = torch.ones(a_tok.shape[:2], dtype=torch.bool, device=device)
        # 3. mix and separate
        mixed = self.mixer({"video": (v_tok, ones_v), "audio": (a_tok, ones_a)})
        # 4. decode: visible positions of the video in the flattened (frame, patch) order
        frame_offset = (torch.arange(T, device=device) * self.v_per_frame).repeat(n)[:, None]  # [n*T, 1]
        v_pos = (v_keep + frame_offset).view(n, -1)  # [n, T*Kv]
        v_pred = self.video_decoder(mixed["video"], v_pos)  # [n, T*Nv, 3p^2]
        a_pred = self.audio_decoder(mixed["audio"], a_keep)  # [n, Na, p^2]
        v_target = patchify(video.flatten(0, 1), self.vp).view(n, T * self.v_per_frame, -1)
        a_target = patchify(audio, self.ap)
        # 5. matching: true pairs vs each video with the next row's audio
        shift = torch.roll(torch.arange(n, device=device), -1)
        shuffled = self.mixer({"video": (v_tok, ones_v), "audio": (a_tok[shift], ones_a)})
        pooled = torch.cat([
            torch.cat([mixed["video"].mean(1), mixed["audio"].mean(1)], -1),
            torch.cat([shuffled["video"].mean(1), shuffled["audio"].mean(1)], -1)])  # [2n, 2W]
        logits = self.match(pooled).squeeze(-1)  # [2n]
        groups = batch.groups(device)
        same = groups[rows] == groups[rows[shift]] if groups is not None else torch.zeros(n, dtype=torch.bool,
                                                                                           device=device)
        labels = torch.cat([torch.ones(n, device=device), same.float()])  # a row paired with itself stays a match
        return {"cmmae_video_pred": v_pred, "cmmae_video_target": v_target, "cmmae_video_mask": v_mask.view(n, -1),
                "cmmae_audio_pred": a_pred, "cmmae_audio_target": a_target, "cmmae_audio_mask": a_mask,
                "cmmae_match_logits": logits, "cmmae_match_labels": labels, "cmmae_weight": weight}
