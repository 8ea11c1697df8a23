"""The full-size cluster recipes on CPU, through the exact code path of a cluster run: Hugging Face cache by Hub id
(HF_HUB_OFFLINE=1), precompute -> `python recipes/train.py` -> eval -> publish, with random stand-ins of the real
models saved in their real formats (the open_clip ViT-B-32 `laion2b_s34b_b79k` teacher at full size, always).

CI runs each recipe with a small stand-in of the student behind the SAME id / the same classes (XLM-R under
FacebookAI/xlm-roberta-base; the audio tower shrunk by overrides); the true full-size students are slow-marked
(MLMM_RUN_SLOW=1)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_cache import put_in_hf_cache, save_open_clip, save_xlmr

REPO = Path(__file__).resolve().parents[1]
MCLIP = REPO / "recipes" / "configs" / "mclip_vit_b32_xlmr.yaml"
AUDIO = REPO / "recipes" / "configs" / "clip4vla_vit_b32_audio.yaml"
TEACHER_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"  # where open_clip fetches the laion2b_s34b_b79k tag from
SMALL_AUDIO = ["model.audio.seconds=0.5", "model.audio.n_mels=32", "model.audio.patch_size=8", "model.audio.width=32",
               "model.audio.layers=2", "model.audio.heads=2"]
TRAIN_OVERRIDES = ["data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "train.max_steps=3",
                   "train.warmup_steps=1", "train.log_every=1", "train.save_every=0", "train.progress=false"]
XLMR_BASE = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab_size": 250002,
             "max_positions": 514}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Generated data (raw shards + the manifest as a parallel-caption JSONL) and the teacher stand-in's folder."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.write_shards import write_shards

    root = tmp_path_factory.mktemp("full_recipes")
    generate(root / "gen", n_images=8, n_videos=2, n_audio=8, size=32, seed=5, progress=False)
    write_shards(root / "gen" / "manifest.jsonl", root / "raw", shard_size=16, progress=False)
    teacher = save_open_clip(root / "teacher", arch="ViT-B-32", seed=0)  # full size: the tag fixes the architecture
    return root, teacher


def hub_home(monkeypatch, root: Path, world_root: Path, xlmr_size: dict) -> Path:
    """An HF_HOME (this process and its children, offline) holding the teacher under its tag's repo and an XLM-R
    stand-in of ``xlmr_size`` under FacebookAI/xlm-roberta-base."""
    from hf_cache import offline_hub

    cache = offline_hub(monkeypatch, root / "hf_home")
    put_in_hf_cache(cache, TEACHER_REPO, world_root / "teacher", link=True)
    captions = [c for r in map(json.loads, (world_root / "gen" / "manifest.jsonl").read_text().splitlines())
                for caps in r["captions"].values() for c in caps]
    save_xlmr(root / "xlmr", captions, **{"max_positions": 130, **xlmr_size})  # 130: the recipe's 77 tokens fit
    put_in_hf_cache(cache, "FacebookAI/xlm-roberta-base", root / "xlmr", move=True)
    return cache


def train(config: Path, out: Path, *overrides) -> subprocess.CompletedProcess:
    """`python recipes/train.py` as on the cluster (one process here), in this test's offline HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(config), f"output_dir={out}",
           *TRAIN_OVERRIDES, *overrides]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def logged_losses(out: Path) -> list[float]:
    lines = [x for x in (out / "train.log").read_text().splitlines() if " step " in x and " loss=" in x]
    return [float(x.split(" loss=")[1].split()[0]) for x in lines]


def check_teacher_identity(export: Path, teacher_dir: Path) -> None:
    from mlmm.hub.pretrained import file_sha256

    (ident,) = json.loads((export / "config.json").read_text())["teachers"]
    assert ident["arch"] == "ViT-B-32" and ident["pretrained"] == "laion2b_s34b_b79k" and ident["hub"] == TEACHER_REPO
    assert ident["sha256"] == file_sha256(teacher_dir / "open_clip_model.safetensors")
    assert "pretrained `laion2b_s34b_b79k`" in (export / "README.md").read_text()


def run_mclip(world, tmp_path, monkeypatch, xlmr_size):
    """precompute (mlmm.distill.parallel) -> train -> eval (student text -> teacher image) -> publish --dry-run."""
    from mlmm.cli import eval_retrieval as run_retrieval  # eval/run_retrieval.py
    from mlmm.distill import parallel
    from mlmm.hub.publish import main as publish_main

    root, _ = world
    hub_home(monkeypatch, tmp_path, root, xlmr_size)
    data = tmp_path / "mclip"
    parallel.main(["--jsonl", str(root / "gen" / "manifest.jsonl"), "--out", str(data), "--teacher", str(MCLIP)])
    index = json.loads((data / "shards" / "index.json").read_text())
    assert index["teacher"]["dim"] == 512
    out = tmp_path / "run"
    train(MCLIP, out, f"data.train_shards={data / 'shards'}")
    losses = logged_losses(out)
    assert len(losses) == 3 and all(0 < x < 1 for x in losses), losses
    export = out / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["text_base_model"] == "FacebookAI/xlm-roberta-base"
    assert config["model"]["text"]["hf_config"]["model_type"] == "xlm-roberta"
    assert config["model"]["text"]["hf_config"]["hidden_size"] == xlmr_size.get("hidden", 32)
    check_teacher_identity(export, root / "teacher")
    assert run_retrieval.main(["--checkpoint", str(export), "--shards", str(root / "raw"), "--text-tower", "student",
                               "--image-tower", "teacher", "--languages", "de,fr", "--out",
                               str(out / "results.json")]) == 0
    assert {r["language"] for r in json.loads((out / "results.json").read_text())["results"]} == {"de", "fr"}
    assert publish_main(["--checkpoint", str(out), "--repo-id", "org/mclip-test", "--dry-run",
                         "--out", str(tmp_path / "hub")]) in (0, None)
    assert (tmp_path / "hub" / "text" / "config.json").is_file()  # the transformers text export (M-CLIP style)
    assert "pretrained `laion2b_s34b_b79k`" in (tmp_path / "hub" / "README.md").read_text()  # the card names it
    return losses


def run_audio(world, tmp_path, monkeypatch, overrides, subprocess_run: bool):
    """precompute (mlmm.distill.precompute) -> train -> publish --dry-run. In CI the training runs in this process
    (the Trainer that recipes/train.py drives; the M-CLIP test covers the CLI and the environment variables)."""
    from mlmm.config import load_config
    from mlmm.distill import precompute
    from mlmm.hub.publish import main as publish_main
    from mlmm.training import Trainer

    root, _ = world
    hub_home(monkeypatch, tmp_path, root, {})
    precompute.main(["--teacher", str(AUDIO), "--shards", str(root / "raw"), "--out", str(tmp_path / "shards")])
    out = tmp_path / "run"
    if subprocess_run:
        train(AUDIO, out, f"data.train_shards={tmp_path / 'shards'}", *overrides)
    else:
        trainer = Trainer(load_config(AUDIO, [*TRAIN_OVERRIDES, f"output_dir={out}",
                                              f"data.train_shards={tmp_path / 'shards'}", *overrides])).setup()
        trainer.train()
        trainer.export()
        trainer.cleanup()
    losses = logged_losses(out)
    assert len(losses) == 3 and all(x == x for x in losses) and max(losses) > 0, losses
    check_teacher_identity(out / "export", root / "teacher")
    assert publish_main(["--checkpoint", str(out), "--repo-id", "org/audio-test", "--dry-run",
                         "--out", str(tmp_path / "hub")]) in (0, None)
    return losses


def test_mclip_recipe_ci_variant(world, tmp_path, monkeypatch):
    run_mclip(world, tmp_path, monkeypatch, {})


def test_clip4vla_audio_recipe_ci_variant(world, tmp_path, monkeypatch):
    run_audio(world, tmp_path, monkeypatch, SMALL_AUDIO, subprocess_run=False)


@pytest.mark.slow
def test_mclip_recipe_full_size(world, tmp_path, monkeypatch):
    """xlm-roberta-base at its real size (278M parameters, 250002-token embedding) behind its real id."""
    run_mclip(world, tmp_path, monkeypatch, XLMR_BASE)


@pytest.mark.slow
def test_clip4vla_audio_recipe_full_size(world, tmp_path, monkeypatch):
    """The ViT-B-sized audio tower over 10 s, 128-mel spectrograms (496 patches), exactly as the recipe says."""
    run_audio(world, tmp_path, monkeypatch, [], subprocess_run=True)
