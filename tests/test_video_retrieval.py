"""Video / audio retrieval end to end: paired video+audio shards, tiny DI-vTR and CMMAE recipes under the Trainer
(and the deepspeed launcher), re-ranking through the eval runner / CLI, and real MSR-VTT clips."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlmm.config import load_config
from mlmm.evaluation.runner import evaluate_retrieval
from mlmm.hub import from_pretrained
from mlmm.training import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def av_data(tmp_path_factory):
    """Paired video+audio clips + a small temporal-order set, in one shard folder, + a tokenizer."""
    from mlmm.synthetic.av import generate_av, generate_order
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards

    root = tmp_path_factory.mktemp("av")
    av = generate_av(root / "gen", n_clips=24, size=32, seed=0)
    order = generate_order(root / "gen", n_repeats=1, size=32, seed=0, colors=("red", "blue"),
                           shapes=("circle", "square"), manifest="order.jsonl")  # 12 ordered pairs
    with open(root / "gen" / "all.jsonl", "w", encoding="utf-8") as f:
        for r in av + order:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_shards(root / "gen" / "manifest.jsonl", root / "av_shards", shard_size=12, progress=False)
    write_shards(root / "gen" / "all.jsonl", root / "shards", shard_size=20, progress=False)
    caps = [c for r in av + order for cs in r["captions"].values() for c in cs]
    train_tokenizer(caps + ["a person is skiing", "a group of kids are dancing"], root / "tok", vocab_size=300)
    return root


def config(recipe, data, out, *overrides, shards="shards"):
    return load_config(CONFIGS / recipe, [f"data.train_shards={data / shards}", f"model.text.tokenizer={data / 'tok'}",
                                          f"output_dir={out}", f"train.ds_config={REPO / 'ds_config.json'}",
                                          "train.progress=false", *overrides])


def test_av_shards_hold_both_modalities(av_data):
    index = json.loads((av_data / "av_shards" / "index.json").read_text())
    assert index["n_samples"] == 24 and index["modalities"] == ["audio", "video"]
    import tarfile

    names = tarfile.open(next((av_data / "av_shards").glob("*.tar"))).getnames()
    assert any(n.endswith(".mp4") for n in names) and any(n.endswith(".wav") for n in names)
    stems = {n.rsplit(".", 1)[0] for n in names if n.endswith(".mp4")}
    assert stems == {n.rsplit(".", 1)[0] for n in names if n.endswith(".wav")}  # every clip has its soundtrack


def test_tiny_divtr_trains_and_reranks_inside_topk(av_data, tmp_path):
    cfg = config("tiny_divtr.yaml", av_data, tmp_path / "run", "train.max_steps=4", "data.batch_size=8",
                 "train.log_every=2")
    trainer = Trainer(cfg).setup()
    history = trainer.train()
    export = trainer.export()
    trainer.cleanup()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert {"global_loss", "interaction_loss"} <= set(history[-1])
    model = from_pretrained(export)
    # the exported interaction head is the trained one
    live = trainer.model.heads["divtr"].state_dict()
    for k, v in model.heads["divtr"].state_dict().items():
        torch.testing.assert_close(v, live[k], rtol=0, atol=0)
    k = 5
    records = evaluate_retrieval(model, str(av_data / "shards"), languages=["en", "de"], rerank_topk=k, progress=False)
    by = {(r["task"], r["language"]): r["metrics"] for r in records}
    for lang in ("en", "de"):
        base, rr = by[("video-text", lang)], by[(f"video-text+rerank@{k}", lang)]
        # re-ranking permutes inside the global top-k only: recall at depth k is unchanged, R@1 <= R@k
        assert rr["t2v_R@5"] == base["t2v_R@5"] and rr["v2t_R@5"] == base["v2t_R@5"]
        assert rr["t2v_R@10"] == base["t2v_R@10"] and rr["v2t_R@10"] == base["v2t_R@10"]
        assert rr["n_texts"] == base["n_texts"] and rr["rerank_topk"] == k
        # ranks beyond the top-k are untouched, so a changed mean rank can only come from inside it
        assert rr["t2v_MnR"] >= 1 and rr["t2v_R@1"] <= rr["t2v_R@5"]
    # this model has no audio tower: no video-audio task
    assert not any(r["task"] == "video-audio" for r in records)


def test_tiny_cmmae_trains_and_evaluates_video_audio(av_data, tmp_path):
    cfg = config("tiny_cmmae.yaml", av_data, tmp_path / "run", "train.max_steps=8", "data.batch_size=8",
                 "train.log_every=4", "train.lr=3e-3", shards="av_shards")
    trainer = Trainer(cfg).setup()
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader

    batch = next(iter(build_train_loader(cfg.data, Preprocessor(cfg.model, trainer.tokenizer, train=False),
                                         rank=0, world_size=1)))

    def mae_loss():
        torch.manual_seed(0)  # same masks before and after
        with torch.no_grad():
            out = trainer.engine.module(batch)
        return float(out["cmmae/video_mae_loss"] + out["cmmae/audio_mae_loss"])

    before = mae_loss()
    history = trainer.train()
    after = mae_loss()
    export = trainer.export()
    trainer.cleanup()
    assert after < before, (before, after)
    assert {"cmmae/video_mae_loss", "cmmae/audio_mae_loss", "cmmae/match_loss"} <= set(history[-1])
    model = from_pretrained(export)
    records = evaluate_retrieval(model, str(av_data / "av_shards"), languages=["en"], progress=False)
    va = [r for r in records if r["task"] == "video-audio"]
    assert len(va) == 1 and va[0]["n"] == 24
    m = va[0]["metrics"]
    assert 0 <= m["v2a_R@1"] <= m["v2a_R@5"] <= 100 and 1 <= m["a2v_MdR"] <= 24
    assert m["chance_v2a_R@1"] == pytest.approx(100 / 24)
    assert {"video-text", "audio-text"} <= {r["task"] for r in records}


def clean_env(**extra):
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in dist_vars}, **extra}


@pytest.mark.slow
def test_deepspeed_launcher_tiny_divtr_and_eval_cli_rerank(av_data, tmp_path):
    """`deepspeed recipes/train.py --config tiny_divtr.yaml` on CPU, then `eval/run_retrieval.py --rerank-topk`."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("deepspeed launcher script not installed next to python")
    import socket

    with socket.socket() as sock:  # a free port: other runs may hold the default one
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(launcher), "--num_gpus", "1", "--master_port", str(port), str(REPO / "recipes" / "train.py"),
           "--config", str(CONFIGS / "tiny_divtr.yaml"), f"data.train_shards={av_data / 'shards'}",
           f"model.text.tokenizer={av_data / 'tok'}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2",
           "data.batch_size=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env=clean_env(PYTHONPATH=str(REPO)))
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    export = tmp_path / "run" / "export"
    assert (export / "model.safetensors").is_file()
    out = tmp_path / "results.json"
    ev = subprocess.run([sys.executable, str(REPO / "eval" / "run_retrieval.py"), "--checkpoint", str(export),
                         "--shards", str(av_data / "shards"), "--languages", "fr", "--rerank-topk", "4",
                         "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300, env=clean_env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    tasks = {r["task"] for r in json.loads(out.read_text())["results"]}
    assert tasks == {"video-text", "video-text+rerank@4"}


@pytest.mark.skipif(not (SHARED / "video" / "manifest.jsonl").is_file(), reason="../shared/data/video not present")
def test_real_msrvtt_clips_decode_and_retrieve(av_data, tmp_path):
    """The real MSR-VTT clips (4 captioned + 1 MSVD clip without caption) through shards -> decode -> retrieval."""
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.data.write_shards import read_manifest, shared_data_manifest, write_shards
    from mlmm.models.model import MultimodalModel
    from transformers import AutoTokenizer

    rows = [r for r in read_manifest(shared_data_manifest(SHARED, tmp_path / "shared.jsonl")) if "video" in r]
    manifest = tmp_path / "video.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    write_shards(manifest, tmp_path / "shards", shard_size=10, progress=False)
    cfg = config("tiny_divtr.yaml", av_data, tmp_path / "unused")
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(av_data / "tok"))).eval()
    items = load_eval_items(str(tmp_path / "shards"), Preprocessor(cfg.model, model.tokenizer, train=False), ["video"])
    video = items["video"]["data"]
    assert video.shape == (5, 4, 3, 32, 32) and items["skipped"] == {}
    assert all(float(v.std()) > 0.05 for v in video)  # real pixels, not padding
    assert not torch.allclose(video[:, 0], video[:, -1])  # frames are sampled over time
    assert len(items["captions"]["en"]) == 4
    records = evaluate_retrieval(model, str(tmp_path / "shards"), dataset="msrvtt", rerank_topk=2, progress=False)
    by = {r["task"]: r for r in records}
    base, rr = by["video-text"], by["video-text+rerank@2"]
    assert base["n"] == 5 and base["metrics"]["n_texts"] == 4  # the uncaptioned clip stays in the gallery
    for m in (base["metrics"], rr["metrics"]):
        assert 1 <= m["t2v_MdR"] <= 5 and 1 <= m["v2t_MnR"] <= 4
    assert rr["metrics"]["t2v_R@5"] == base["metrics"]["t2v_R@5"] == 100.0
