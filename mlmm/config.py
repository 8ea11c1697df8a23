"""Typed run configuration: dataclasses loaded from YAML plus dotted command-line overrides.

    cfg = load_config("recipes/configs/tiny_clip.yaml", ["train.max_steps=50", "model.text.layers=2"])

Every key is checked against the dataclass that owns it; an unknown key, a value of the wrong type or out of its
range raises :class:`ConfigError` with a one-line message naming the dotted key and the file.
Registered components (losses, heads) carry their own config dataclass: ``loss.name`` picks the class
from :mod:`mlmm.registry` and the rest of the ``loss`` section is validated against it.

Every numeric field declares its range in its class's ``RANGES`` (``{"lr": "> 0", "max_bad_fraction": "[0, 1]"}``,
see :mod:`mlmm.ranges`), which :func:`mlmm.typed.from_dict` (keys, types, ranges, then the class's ``validate``) checks.
:func:`load_config` also refuses a local shard spec that resolves to no shard and a tokenizer / pretrained path that
looks local and does not exist.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import yaml

from mlmm.config_paths import check_paths, resolve_package_path
from mlmm.modalities import BUILT_IN, MODALITIES, modality
from mlmm.typed import ConfigError, apply_overrides, coerce, from_dict


# --------------------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    # a shard folder (with index.json), a glob, a brace range, URLs (http(s)://, s3://, gs://) or pipe:CMD, or
    # several joined by "," (mlmm.data.shards.resolve_shards)
    train_shards: str = ""
    # a parallel-caption JSONL ({"captions": {lang: str | [str]}} per line): train_shards (a folder) is prepared
    # from it on first use, with the loss teacher's embeddings, and reused while JSONL and teacher are unchanged
    parallel_jsonl: Optional[str] = None
    # samples per shard, for resuming without opening the shards before the position: a path, URL or pipe: spec of
    # open_clip's sizes.json {shard_name: n} or of an mlmm index.json. None: the index.json / sizes.json beside
    shard_sizes: Optional[str] = None
    io_retries: int = 3  # re-opens of a shard whose open or stream fails, before it counts as a bad shard
    io_backoff: float = 1.0  # seconds before the first retry, doubled for each further one
    batch_size: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 256  # samples kept in the shuffle buffer (0 = no sample shuffle)
    languages: Optional[list[str]] = None  # None = every language in the shards
    language_policy: str = "random_language"  # random_language | all_languages | fixed
    seed: int = 0
    max_bad_fraction: float = 0.1  # abort when more than this fraction of samples is unusable
    text_field: str = "captions"  # sample-json field {lang: str | [str]} giving the text input ("question" for VQA)
    # images / frames leave the loader as uint8 and are normalised on the training device: 4x less host memory,
    # pinned copies and host-to-device traffic, and no float work in the loader workers (for GPU runs)
    normalize_on_device: bool = False
    # RGB / greyscale JPEG images leave the loader as bytes (+ a crop box read from the header) and are decoded on
    # the training device: nvJPEG via torchvision.io.decode_jpeg on CUDA, so loader workers only read shards.
    # Implies normalize_on_device. Other images, video frames and extra images decode in the workers as usual
    decode_on_device: bool = False
    # audio leaves the loader as fixed-length float32 waveforms (resampled, cropped / padded in the workers) and its
    # log-mel is computed per batch on the training device (one MelSpectrogram call; needs model.audio)
    logmel_on_device: bool = False
    RANGES: ClassVar[dict] = {"io_retries": ">= 0", "io_backoff": ">= 0", "batch_size": ">= 1", "num_workers": ">= 0",
                              "shuffle_buffer": ">= 0", "seed": ">= 0", "max_bad_fraction": "[0, 1]"}

    def validate(self, where: str) -> None:
        policies = ("random_language", "all_languages", "fixed")
        if self.language_policy not in policies:
            raise ConfigError(f"{where}.language_policy: must be one of {policies}, got {self.language_policy!r}")
        if self.language_policy == "fixed" and not self.languages:
            raise ConfigError(f"{where}.languages: language_policy 'fixed' needs a list of languages")
        if self.parallel_jsonl and (not self.train_shards or re.search(r"://|^pipe:|[,*?\[{]", self.train_shards)):
            raise ConfigError(f"{where}.train_shards: data.parallel_jsonl needs one local folder to prepare the shards "
                              f"in, got {self.train_shards!r}")


@dataclass
class ImageTowerConfig:
    image_size: int = 32
    patch_size: int = 8
    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    pooling: str = "cls"  # cls | mean (over patch tokens) | gpo (generalized pooling operator over patch tokens)
    # open_clip weights for this tower (+ its projection when embed_dim matches), loaded when the model is built:
    # "ARCH:TAG" (ViT-B-32:laion2b_s34b_b79k), "hf-hub:org/name[@rev]", "local-dir:DIR" or a weights file
    pretrained: Optional[str] = None
    RANGES: ClassVar[dict] = {"image_size": ">= 1", "patch_size": ">= 1", "width": ">= 1", "layers": ">= 1",
                              "heads": ">= 1", "mlp_ratio": "> 0"}

    def validate(self, where: str) -> None:
        if self.pooling not in ("cls", "mean", "gpo"):
            raise ConfigError(f"{where}.pooling: must be 'cls', 'mean' or 'gpo', got {self.pooling!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{where}.patch_size: {self.patch_size} does not divide image_size {self.image_size}")
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")


@dataclass
class VideoTowerConfig:
    frames: int = 4  # frames sampled uniformly from each clip
    temporal_layers: int = 1  # transformer over per-frame features
    heads: int = 2
    share_image_tower: bool = True  # frame encoder = the image tower (needs model.image)
    frame_encoder: Optional[ImageTowerConfig] = None  # own frame encoder when not shared
    # contextual video encoder (DI-vTR): audio tokens of width `audio_width` may join the temporal transformer
    # (VideoTower.forward_tokens(video, audio_tokens=..., audio_mask=...)); off by default
    audio_context: bool = False
    audio_width: int = 32
    RANGES: ClassVar[dict] = {"frames": ">= 1", "temporal_layers": ">= 0", "heads": ">= 1", "audio_width": ">= 1"}


@dataclass
class AudioTowerConfig:
    sample_rate: int = 16000
    seconds: float = 1.0  # clips are cropped / zero-padded to this length
    n_mels: int = 32
    n_fft: int = 400
    hop_length: int = 160
    patch_size: int = 8  # square patches over (mel, time)
    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp_ratio: float = 4.0
    RANGES: ClassVar[dict] = {"sample_rate": ">= 1", "seconds": "> 0", "n_mels": ">= 1", "n_fft": ">= 1",
                              "hop_length": ">= 1", "patch_size": ">= 1", "width": ">= 1", "layers": ">= 1",
                              "heads": ">= 1", "mlp_ratio": "> 0"}

    @property
    def frames(self) -> int:
        """Number of log-mel frames for `seconds` of audio (torchaudio's centred STFT)."""
        return int(self.sample_rate * self.seconds) // self.hop_length + 1

    def validate(self, where: str) -> None:
        if self.n_mels % self.patch_size:
            raise ConfigError(f"{where}.patch_size: {self.patch_size} does not divide n_mels {self.n_mels}")
        if self.frames < self.patch_size:
            raise ConfigError(f"{where}.seconds: {self.seconds}s gives {self.frames} frames < patch_size")


@dataclass
class VocabExtensionConfig:
    """``model.text.extend_vocab``: whole words of new languages appended to a pretrained WordPiece vocabulary
    (:mod:`mlmm.data.vocab`); their embeddings start as the mean of the pieces the old vocabulary split them into."""
    corpus: str = ""  # parallel-caption JSONL ({"captions": {lang: str | [str]}} per line) to count words in
    languages: list[str] = field(default_factory=list)  # caption languages whose words are added
    min_frequency: int = 3  # a word must occur this often in those languages
    max_words: int = 10000  # at most this many new tokens (the most frequent first)
    keep_language: Optional[str] = "en"  # words that would change how this language's corpus words split are left out
    RANGES: ClassVar[dict] = {"min_frequency": ">= 1", "max_words": ">= 1"}

    def validate(self, where: str) -> None:
        if not self.corpus:
            raise ConfigError(f"{where}.corpus: a parallel-caption JSONL to take the words from is required")
        if not self.languages:
            raise ConfigError(f"{where}.languages: name the caption languages whose words are added")


@dataclass
class TextTowerConfig:
    tokenizer: str = ""  # transformers.AutoTokenizer folder or Hub id (org/name[@revision]); default: pretrained
    pretrained: Optional[str] = None  # HF model folder or Hub id (org/name[@revision]); None = build from the fields
    arch: str = "bert"  # transformers model_type used when building from scratch, or "clip" (native CLIP-style tower)
    hidden: int = 32
    layers: int = 2
    heads: int = 2
    intermediate: int = 64
    max_length: int = 32
    pooling: str = "mean"  # mean | cls | gpo (generalized pooling operator over the real tokens)
    hf_config: Optional[dict] = None  # set by exports of a `pretrained` tower: its transformers config
    extend_vocab: Optional[VocabExtensionConfig] = None  # new-language words added to a pretrained WordPiece vocab
    RANGES: ClassVar[dict] = {"hidden": ">= 1", "layers": ">= 1", "heads": ">= 1", "intermediate": ">= 1",
                              "max_length": ">= 1"}

    def validate(self, where: str) -> None:
        if self.pooling not in ("mean", "cls", "gpo"):
            raise ConfigError(f"{where}.pooling: must be 'mean', 'cls' or 'gpo', got {self.pooling!r}")
        if self.arch == "clip" and self.hidden % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide hidden {self.hidden}")
        self.tokenizer = resolve_package_path(self.tokenizer, f"{where}.tokenizer") or ""
        self.pretrained = resolve_package_path(self.pretrained, f"{where}.pretrained")
        if not self.tokenizer and not self.pretrained:
            raise ConfigError(f"{where}.tokenizer: required: a tokenizer folder or Hub id (org/name), or set "
                              f"{where}.pretrained (its tokenizer is used)")


@dataclass
class ModelConfig:
    embed_dim: int = 32
    init_logit_scale: float = 2.6593  # log(1 / 0.07), as CLIP
    image: Optional[ImageTowerConfig] = None
    video: Optional[VideoTowerConfig] = None
    audio: Optional[AudioTowerConfig] = None
    text: Optional[TextTowerConfig] = None
    # towers of modalities registered beyond image/video/audio/text (mlmm.modalities.register): written as
    # model.<name>: {...} like the four above, kept here as {name: its tower config}
    more: dict = field(default_factory=dict)
    # task heads / fusion modules run after the towers: {instance: {name: <registered head>, ...}}
    heads: dict = field(default_factory=dict)
    # projections tower -> embed_dim: "normal" (random, std = width^-0.5) or "identity" (needs every tower's
    # width == embed_dim): a pretrained tower then starts exactly where its teacher is (distillation)
    proj_init: str = "normal"
    RANGES: ClassVar[dict] = {"embed_dim": ">= 1", "init_logit_scale": "any"}

    def validate(self, where: str) -> None:
        from mlmm.registry import HEADS, build_component_config

        if self.proj_init not in ("normal", "identity"):
            raise ConfigError(f"{where}.proj_init: must be 'normal' or 'identity', got {self.proj_init!r}")

        for m, raw in self.more.items():
            if m not in MODALITIES or m in BUILT_IN:
                raise ConfigError(f"{where}.{m}: unknown key (not a registered modality)")
            if not dataclasses.is_dataclass(raw):
                self.more[m] = None if raw is None else coerce(raw, modality(m).load("config"), f"{where}.{m}")
        self.more = {m: c for m, c in self.more.items() if c is not None}
        self.heads = {k: v if dataclasses.is_dataclass(v) else build_component_config(HEADS, v, f"{where}.heads.{k}")
                      for k, v in self.heads.items()}
        if self.video is not None and self.video.share_image_tower and self.image is None:
            raise ConfigError(f"{where}.video.share_image_tower: true needs a model.image tower")
        if self.video is not None and not self.video.share_image_tower and self.video.frame_encoder is None:
            raise ConfigError(f"{where}.video.frame_encoder: required when share_image_tower is false")
        if self.video is not None and self.video.frame_encoder is not None and self.video.frame_encoder.pretrained:
            raise ConfigError(f"{where}.video.frame_encoder.pretrained: not supported; set model.image.pretrained and "
                              "video.share_image_tower: true")
        if not self.modalities:
            raise ConfigError(f"{where}: no tower configured (set at least one of {MODALITIES})")

    @classmethod
    def gather_sections(cls, data: dict) -> dict:
        """``model.<name>`` sections of registered modalities that are not fields here -> ``more``."""
        extra = {k: v for k, v in data.items() if k in MODALITIES and k not in BUILT_IN}
        if not extra:
            return data
        return {**{k: v for k, v in data.items() if k not in extra}, "more": {**data.get("more", {}), **extra}}

    def tower(self, m: str) -> Any:
        """The tower config of modality ``m`` (None when the model has no such tower)."""
        return getattr(self, m) if m in BUILT_IN else self.more.get(m)

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if self.tower(m) is not None]


@dataclass
class TrainConfig:
    max_steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    ds_config: str = "ds_config.json"  # ZeRO stage / precision / offload; batch sizes come from here
    zero_stage: Optional[int] = None  # overrides ds_config when set
    grad_accum: int = 1
    log_every: int = 10
    save_every: int = 500  # a checkpoint every N steps, and at the end (0 = only at the end)
    keep_checkpoints: int = 2
    # auto: the newest sound checkpoint in output_dir/checkpoints, if any | force: the same, even when it was written
    # by another run config (the changed keys are logged) | never: a new run (refused over an earlier run's
    # checkpoints) | step_N: exactly that checkpoint. See mlmm.training.resume
    resume: str = "auto"
    # resume from checkpoint files mlmm did not fingerprint (DeepSpeed unpickles them: torch.load(weights_only=False))
    trust_checkpoint: bool = False
    nan_patience: int = 5  # abort after this many consecutive steps with a non-finite loss / grad norm
    compile: bool = False  # torch.compile each tower in place (state-dict keys unchanged); not the DeepSpeed engine
    gradient_checkpointing: bool = False  # every tower recomputes its blocks' activations in backward (less memory)
    tensorboard: bool = True
    progress: bool = True
    # fine-tuning (generic; used e.g. by MLA stage 2): weights of an mlmm export folder loaded into the model
    # before DeepSpeed init (every saved key must exist with the same shape; model keys missing from the export
    # are allowed only when `trainable` selects them), and regexes (re.fullmatch on TrainModule parameter names,
    # e.g. "model\\.heads\\..*", "loss\\..*") selecting the trainable parameters; None = all trainable
    init_from: Optional[str] = None
    trainable: Optional[list[str]] = None
    RANGES: ClassVar[dict] = {
        "max_steps": ">= 1", "lr": "> 0", "weight_decay": ">= 0", "betas": "[0, 1)", "eps": "> 0",
        "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "grad_clip": ">= 0", "zero_stage": "[0, 3]",
        "grad_accum": ">= 1", "log_every": ">= 1", "save_every": ">= 0", "keep_checkpoints": ">= 0",
        "nan_patience": ">= 1"}

    def validate(self, where: str) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"{where}.precision: must be auto|fp32|bf16|fp16, got {self.precision!r}")
        if self.resume not in ("auto", "force", "never") and not re.fullmatch(r"step_\d+", self.resume):
            raise ConfigError(f"{where}.resume: must be auto, force, never or a checkpoint tag step_N, "
                              f"got {self.resume!r}")
        for i, pattern in enumerate(self.trainable or []):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"{where}.trainable[{i}]: invalid regex {pattern!r}: {e}") from None


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: Any = None  # a registered loss config dataclass (see mlmm.registry), chosen by loss.name
    train: TrainConfig = field(default_factory=TrainConfig)
    config_path: str = ""  # set by load_config; not read from YAML
    RANGES: ClassVar[dict] = {"seed": ">= 0"}

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("config_path")
        return out


# --------------------------------------------------------------------------------------- loading
def build_config(raw: dict) -> RunConfig:
    """Validate a raw mapping (already YAML-parsed and overridden) into a RunConfig."""
    from mlmm.registry import LOSSES, build_component_config  # late: the registry imports the losses

    raw = dict(raw)
    loss_raw = raw.pop("loss", None) or {"name": "contrastive"}
    cfg = from_dict(RunConfig, raw)
    cfg.loss = build_component_config(LOSSES, loss_raw, "loss")
    for loss_cfg in [cfg.loss, *getattr(cfg.loss, "terms", {}).values()]:  # checks that read other sections
        if hasattr(loss_cfg, "check_run"):
            loss_cfg.check_run(cfg)
    from mlmm.contracts import check

    check(cfg)  # every output a head or the loss reads is written by a tower or an earlier head
    if cfg.data.logmel_on_device and cfg.model.audio is None:
        raise ConfigError("data.logmel_on_device: the model has no audio tower (model.audio); remove the switch")
    return cfg


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read, override, validate (keys, types, ranges, cross-field rules) and check local inputs (:func:`check_paths`);
    any problem raises :class:`ConfigError` ``<file>: <dotted.key>: <what is wrong>`` (one line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        cfg = build_config(apply_overrides(raw, list(overrides or [])))
        check_paths(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.config_path = str(path)
    return cfg
