"""End-to-end training through the real DeepSpeed engine on CPU (gloo, one process)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_data
import torch

from mlmm.config import load_config
from mlmm.data.preprocess import Preprocessor
from mlmm.data.train_stream import build_train_loader
from mlmm.evaluation.runner import evaluate_retrieval
from mlmm.hub import from_pretrained
from mlmm.training import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_clip.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("tiny_data"), n_images=96, n_videos=24, n_audio=64,
                           shard_size=50, seed=1)


def tiny_config(data: Path, out: Path, *overrides):
    return load_config(TINY, [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
                              f"output_dir={out}", f"train.ds_config={REPO / 'ds_config.json'}",
                              "train.progress=false", *overrides])


def fixed_batch(cfg, trainer):
    pre = Preprocessor(cfg.model, trainer.tokenizer, train=False)
    return next(iter(build_train_loader(cfg.data, pre, rank=0, world_size=1)))


def eval_loss(trainer, batch):
    with torch.no_grad():
        return float(trainer.engine.module(batch)["loss"])


@pytest.mark.parametrize("stage,text_arch", [(1, "bert"), (2, "bert"), (3, "bert"), (3, "clip")])
def test_zero_stage_trains_and_loss_drops(tiny_data, tmp_path, stage, text_arch):
    cfg = tiny_config(tiny_data, tmp_path / "run", f"train.zero_stage={stage}", "train.max_steps=20",
                      "data.batch_size=32", f"model.text.arch={text_arch}")
    trainer = Trainer(cfg).setup()
    assert trainer.engine.zero_optimization_stage() == stage
    batch = fixed_batch(cfg, trainer)
    before = eval_loss(trainer, batch)
    history = trainer.train()
    after = eval_loss(trainer, batch)
    export = trainer.export()
    trainer.cleanup()
    assert after < before - 0.3, (before, after)
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    assert (export / "model.safetensors").is_file()
    # the exported weights are the trained (ZeRO-3: gathered) ones
    model = from_pretrained(export)
    sd = trainer.model.state_dict()
    if stage != 3:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, sd[k])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_checkpoint_resume_restores_parameters_and_step(tiny_data, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tiny_data, out, "train.max_steps=6", "train.save_every=3")
    first = Trainer(cfg).setup()
    first.train()
    params = {k: v.detach().clone() for k, v in first.engine.module.state_dict().items()}
    opt_state = first.engine.optimizer.state_dict()
    first.cleanup()
    state = json.loads((out / "checkpoints" / "step_00000006" / "mlmm_state.json").read_text())
    assert state["step"] == 6 and (out / "checkpoints" / "latest").read_text() == "step_00000006"

    resumed = Trainer(tiny_config(tiny_data, out, "train.max_steps=8")).setup()
    assert resumed.step == 6
    for k, v in resumed.engine.module.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    # the scheduler position is restored; the schedule follows the new max_steps (a legitimate edit, applied)
    from mlmm.training.schedule import warmup_cosine

    assert first.engine.get_lr()[0] == 0.0  # the end of the first run's cosine
    assert resumed.engine.get_lr()[0] == pytest.approx(2e-3 * warmup_cosine(6, warmup_steps=2, max_steps=8))
    assert opt_state is not None
    resumed.train()
    resumed.cleanup()
    assert resumed.step == 8 and (out / "checkpoints" / "step_00000008").is_dir()
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept == ["step_00000006", "step_00000008"]  # keep_checkpoints = 2


def test_export_reload_gives_identical_embeddings_and_beats_chance(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "run", "train.max_steps=120", "data.batch_size=32",
                      "train.log_every=40")
    trainer = Trainer(cfg).setup()
    trainer.train()
    export = trainer.export()
    trainer.cleanup()
    model = from_pretrained(export)
    live = trainer.model.eval()
    texts = ["a red circle", "ein blaues Quadrat", "un triangle vert"]
    torch.testing.assert_close(model.encode_text(texts), live.encode_text(texts), rtol=0, atol=0)
    batch = fixed_batch(cfg, trainer)
    with torch.no_grad():
        for m in ("image", "video", "audio"):
            x = getattr(batch, m)[:4]
            torch.testing.assert_close(model.encode(m, x), live.encode(m, x), rtol=0, atol=0)
    records = evaluate_retrieval(model, str(tiny_data / "shards"), languages=["en", "de"], progress=False)
    image = {r["language"]: r["metrics"] for r in records if r["task"] == "image-text"}
    for lang in ("en", "de"):
        m = image[lang]
        assert m["i2t_R@1"] > 3 * m["chance_i2t_R@1"], (lang, m["i2t_R@1"], m["chance_i2t_R@1"])
    audio = {r["language"]: r["metrics"] for r in records if r["task"] == "audio-text"}
    assert audio["en"]["a2t_R@1"] > 2 * audio["en"]["chance_a2t_R@1"]


def clean_env(**extra):
    """The in-process tests set RANK/MASTER_PORT...; a child process must pick its own."""
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in dist_vars}, **extra}


def test_train_cli_single_process_and_bad_key(tiny_data, tmp_path):
    base = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(TINY),
            f"data.train_shards={tiny_data / 'shards'}", f"model.text.tokenizer={tiny_data / 'tok'}",
            f"output_dir={tmp_path / 'run'}", "train.max_steps=2"]
    bad = subprocess.run(base + ["train.max_stepz=3"], capture_output=True, text=True, cwd=REPO, env=clean_env())
    assert bad.returncode == 2 and "train.max_stepz: unknown key" in bad.stderr
    ok = subprocess.run(base, capture_output=True, text=True, cwd=REPO, timeout=300, env=clean_env())
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "run" / "export" / "config.json").is_file()


def test_deepspeed_launcher_on_cpu(tiny_data, tmp_path):
    """`deepspeed --num_gpus 1 recipes/train.py ...` (the launcher appends --local_rank=0)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("deepspeed launcher script not installed next to python")
    cmd = [str(launcher), "--num_gpus", "1", "--master_port", "29561", str(REPO / "recipes" / "train.py"),
           "--config", str(TINY), f"data.train_shards={tiny_data / 'shards'}",
           f"model.text.tokenizer={tiny_data / 'tok'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
           "train.zero_stage=3"]
    env = clean_env(PYTHONPATH=str(REPO))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_gradient_checkpointing_and_optimizer_offload_train_like_the_plain_path(tiny_data, tmp_path):
    """train.gradient_checkpointing (every tower) and ZeRO-Offload of the optimizer through ds_config.json give the
    plain ZeRO-2 run's losses step by step (the step-2+ losses see the updates, so the gradients match too)."""
    offload = json.loads((REPO / "ds_config.json").read_text())
    offload["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    (tmp_path / "ds_offload.json").write_text(json.dumps(offload))
    runs = {"plain": [], "checkpointing": ["train.gradient_checkpointing=true"],
            "offload": [f"train.ds_config={tmp_path / 'ds_offload.json'}"]}
    losses = {}
    for name, extra in runs.items():
        cfg = tiny_config(tiny_data, tmp_path / name, "train.max_steps=3", "train.log_every=1", *extra)
        trainer = Trainer(cfg).setup()
        if name == "checkpointing":
            assert trainer.model.towers["image"].transformer.grad_checkpointing
            assert trainer.model.towers["audio"].transformer.grad_checkpointing
            assert trainer.model.towers["video"].transformer.grad_checkpointing
            assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.towers["text"].modules())
        if name == "offload":
            assert trainer.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
            assert trainer.engine.zero_cpu_offload()
        losses[name] = [h["loss"] for h in trainer.train()]
        trainer.cleanup()
    assert len(losses["plain"]) == 3
    for name in ("checkpointing", "offload"):
        torch.testing.assert_close(torch.tensor(losses[name]), torch.tensor(losses["plain"]), rtol=1e-5, atol=1e-6,
                                   msg=name)
