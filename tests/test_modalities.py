"""One modality spec (mlmm.modalities): the writer and the reader take the same files, and a new modality is one
registered entry plus its tower config, tower and decoder: a toy "sensor" modality (a text file of numbers) goes
through the shard writer, the reader, the config, the model, a training step through the real trainer, the export
and retrieval evaluation without any other change to mlmm."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from mlmm.config import ConfigError, load_config
from mlmm.data.from_hf import AUDIO_FORMATS, IMAGE_FORMATS
from mlmm.data.preprocess import Preprocessor
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.data.write_shards import write_shards
from mlmm.modalities import MEDIA, MODALITIES, Modality, modality, register, unregister

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ reader == writer
def media_file(ext: str, path: Path) -> Path:
    """A tiny real file of that format."""
    if ext in modality("image").extensions:
        from PIL import Image

        fmt = {"jpg": "JPEG", "jpeg": "JPEG"}.get(ext, ext.upper())
        Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(path, format=fmt)
    elif ext in modality("audio").extensions:
        import soundfile as sf

        sf.write(path, np.sin(np.linspace(0, 200, 8000)).astype(np.float32), 16000, format=ext.upper())
    else:
        import av

        codec = {"webm": "libvpx", "avi": "mpeg4"}.get(ext, "libx264")
        with av.open(str(path), "w", format={"mkv": "matroska"}.get(ext, ext)) as out:
            stream = out.add_stream(codec, rate=8)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for i in range(8):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 30 * i, dtype=np.uint8), format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
    return path


def test_the_writer_stores_every_extension_the_reader_decodes(tmp_path):
    """Before the spec the writer refused webp / webm / mkv / ogg files that the reader decodes."""
    rows = []
    for m in ("image", "video", "audio"):
        for ext in modality(m).extensions:
            path = media_file(ext, tmp_path / f"{m}-{ext}.{ext}")
            rows.append({"key": f"{m}-{ext}", m: path.name, "captions": {"en": f"a {ext} file"}})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = write_shards(tmp_path / "manifest.jsonl", tmp_path / "shards", shard_size=100, progress=False)
    assert index["skipped"] == [] and index["n_samples"] == len(rows), index["skipped"]
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_clip.yaml", ["model.text=null",
                                                                          "loss.pairs=[[image, video]]"])
    pre = Preprocessor(cfg.model, train=False)
    decoded = {}
    for raw in iter_samples(resolve_shards(str(tmp_path / "shards"))):
        out = pre.media(raw)
        decoded[raw["__key__"]] = sorted(out)
    # every file decodes as its modality; .jpeg is stored as jpg
    assert decoded == {r["key"]: [r["key"].split("-")[0]] for r in rows}
    # and what from_hf stores as-is is in the same table
    assert set(IMAGE_FORMATS.values()) <= set(modality("image").extensions)
    assert set(AUDIO_FORMATS.values()) <= set(modality("audio").extensions)


def test_names_codes_and_tasks_come_from_the_table():
    assert tuple(MODALITIES) == ("image", "video", "audio", "text") and tuple(MEDIA) == ("image", "video", "audio")
    assert [modality(m).code for m in MODALITIES] == ["i", "v", "a", "t"]
    assert modality("video").eval_tasks == ("video-text", "video-text-hashing", "video-audio")
    assert modality("image").writer_suffixes()[".jpeg"] == "jpg"
    with pytest.raises(ValueError, match=r"code 'i' is 'image'"):
        register(Modality("icon", "i", ("ico",)))
    with pytest.raises(ValueError, match=r"file suffixes \['\.png'\] are 'image'"):
        register(Modality("scan", "x", ("png",)))
    with pytest.raises(ValueError, match="built in"):
        unregister("image")


# ------------------------------------------------------------------------------------------ a toy modality
@dataclass
class SensorTowerConfig:
    dim: int = 8  # numbers per reading
    width: int = 16

    def validate(self, where: str) -> None:
        if self.dim < 1:
            raise ConfigError(f"{where}.dim: must be >= 1, got {self.dim}")


class SensorTower(nn.Module):
    """An MLP over one reading [B, dim] -> [B, width]; its "tokens" are the single pooled vector."""

    def __init__(self, cfg: SensorTowerConfig):
        super().__init__()
        self.width = cfg.width
        self.net = nn.Sequential(nn.Linear(cfg.dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).unsqueeze(1)  # [B, 1, width]

    def pool(self, tokens: torch.Tensor, attention=None) -> torch.Tensor:
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_tokens(x))


def read_numbers(data: bytes) -> np.ndarray:
    return np.loadtxt(io.StringIO(data.decode("ascii")), dtype=np.float32, ndmin=1)


def decode_sensor(pre, data: bytes, rng) -> dict[str, torch.Tensor]:
    (dim,) = pre.shapes["sensor"]
    try:
        x = torch.from_numpy(read_numbers(data))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"not a sensor reading: {e}") from e
    if x.shape != (dim,):
        raise ValueError(f"a reading of {tuple(x.shape)} numbers, expected {dim}")
    return {"sensor": x}


SENSOR = Modality("sensor", "s", ("sns",), config=SensorTowerConfig, tower=SensorTower,
                  shape=lambda cfg: None if cfg.tower("sensor") is None else (cfg.tower("sensor").dim,),
                  decoder=decode_sensor, check=read_numbers, input="a reading of `dim` numbers")


@pytest.fixture
def sensor():
    register(SENSOR)
    yield SENSOR
    unregister("sensor")


def sensor_data(root: Path, n: int = 24) -> Path:
    """n readings in 3 patterns, captioned by pattern in en / de; one unreadable file."""
    from mlmm.data.tokenization import train_tokenizer

    rng = np.random.default_rng(0)
    words = [("rising", "steigend"), ("falling", "fallend"), ("flat", "flach")]
    rows = []
    for i in range(n):
        k = i % 3
        base = [np.linspace(0, 1, 8), np.linspace(1, 0, 8), np.full(8, 0.5)][k]
        (root / f"r{i}.sns").write_text(" ".join(f"{v:.4f}" for v in base + 0.05 * rng.standard_normal(8)))
        rows.append({"key": f"r{i:03d}", "sensor": f"r{i}.sns",
                     "captions": {"en": f"a {words[k][0]} reading", "de": f"ein {words[k][1]}er Wert"}})
    (root / "bad.sns").write_text("not numbers")
    rows.append({"key": "bad", "sensor": "bad.sns", "captions": {"en": "a broken reading"}})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer([c for r in rows for c in r["captions"].values()] * 4, root / "tok", vocab_size=120)
    return root


def sensor_config(root: Path, out: Path, **extra) -> Path:
    cfg = {"name": "sensor", "output_dir": str(out), "seed": 0,
           "data": {"train_shards": str(root / "shards"), "batch_size": 8, "shuffle_buffer": 8,
                    "language_policy": "random_language"},
           "model": {"embed_dim": 16, "sensor": {"dim": 8, "width": 16},
                     "text": {"tokenizer": str(root / "tok"), "hidden": 16, "layers": 1, "heads": 2,
                              "intermediate": 32, "max_length": 16}},
           "loss": {"name": "contrastive", "pairs": [["sensor", "text"]]},
           "train": {"max_steps": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "zero_stage": 0,
                     "ds_config": str(REPO / "ds_config.json"), "tensorboard": False, "progress": False},
           **extra}
    path = out.parent / "sensor.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_registered_toy_modality_is_written_read_trained_exported_and_evaluated(sensor, tmp_path):
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.hub import from_pretrained
    from mlmm.training import Trainer

    (tmp_path / "data").mkdir()
    root = sensor_data(tmp_path / "data")
    index = write_shards(root / "manifest.jsonl", root / "shards", shard_size=10, progress=False)
    # the writer took .sns files and ran the modality's check on each
    assert index["n_samples"] == 24 and [s["key"] for s in index["skipped"]] == ["bad"], index["skipped"]
    assert index["modalities"] == ["sensor"]
    cfg = load_config(sensor_config(root, tmp_path / "run"))
    assert cfg.model.modalities == ["text", "sensor"] and cfg.model.tower("sensor").width == 16
    trainer = Trainer(cfg).setup()
    assert type(trainer.model.towers["sensor"]) is SensorTower
    history = trainer.train()
    export = trainer.export()
    trainer.cleanup()
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    # the export's config.json keeps the toy tower's config; it loads back while the modality is registered
    model = from_pretrained(export)
    assert model.cfg.tower("sensor") == cfg.model.tower("sensor")
    records = evaluate_retrieval(model, str(root / "shards"), languages=["en"], dataset="sensor", progress=False)
    (rec,) = records
    assert rec["task"] == modality("sensor").text_task == "sensor-text"
    assert {"t2s_R@1", "s2t_R@1", "chance_t2s_R@1"} <= set(rec["metrics"]) and rec["n"] == 24


def test_an_unregistered_modality_section_is_an_unknown_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.sensor: unknown key"):
        load_config(sensor_config(tmp_path, tmp_path / "run"))
