"""Runs that die must resume exactly; bad data and NaNs are survived and counted."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import build_tiny_data
import torch

from mlmm.config import load_config
from mlmm.hub import load_state_dict
from mlmm.training import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_clip.yaml"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def rel_data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("rel_data"), n_images=60, n_videos=12, n_audio=40,
                           shard_size=16, seed=2)


def overrides(data: Path, out: Path, *extra):
    return [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}", f"output_dir={out}",
            f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.warmup_steps=2",
            "data.batch_size=8", "data.shuffle_buffer=20", *extra]


def run_in_process(data, out, *extra):
    trainer = Trainer(load_config(TINY, overrides(data, out, *extra))).setup()
    trainer.train()
    export = trainer.export()
    trainer.cleanup()
    return trainer, load_state_dict(export / "model.safetensors")


def run_killed(data, out, fault, *extra):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["MLMM_INJECT_FAULT"] = fault
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(TINY), *overrides(data, out, *extra)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == -9, (res.returncode, res.stderr[-3000:])  # SIGKILL, as the fault asked


@pytest.mark.parametrize("workers,language_policy", [(0, "random_language"), (2, "all_languages")])
def test_sigkill_mid_epoch_then_resume_is_exact(rel_data, tmp_path, workers, language_policy):
    """Kill after step 7 (checkpoint at 4), resume: the same losses for steps 5-12 and the same weights."""
    common = ["train.max_steps=12", "train.save_every=4", f"data.num_workers={workers}",
              f"data.language_policy={language_policy}", "train.log_every=100"]
    ref, ref_weights = run_in_process(rel_data, tmp_path / "ref", *common)
    run_killed(rel_data, tmp_path / "killed", "after_step:7", *common)
    ckpt = tmp_path / "killed" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    resumed, weights = run_in_process(rel_data, tmp_path / "killed", *common)
    assert resumed.losses == pytest.approx(ref.losses[4:], abs=1e-6)
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=0, atol=1e-6)
    # the epoch continues where it stopped: the 12 * 8 samples (< one epoch) are all distinct
    state = json.loads((ckpt / "step_00000012" / "mlmm_state.json").read_text())
    assert state["data"]["world_size"] == 1 and state["data"]["ranks"][0]["slots"]


@pytest.mark.parametrize("fault", ["after_weights:8", "before_latest:8"])
def test_kill_during_save_leaves_previous_checkpoint_loadable(rel_data, tmp_path, fault):
    common = ["train.max_steps=10", "train.save_every=4", "train.log_every=100"]
    run_killed(rel_data, tmp_path / "run", fault, *common)
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000004"
    trainer = Trainer(load_config(TINY, overrides(rel_data, tmp_path / "run", *common))).setup()
    assert trainer.step == 4
    trainer.train()
    trainer.cleanup()
    assert (ckpt / "latest").read_text() == "step_00000010"
    assert not list(ckpt.glob("*.tmp"))


def test_kill_between_rename_and_latest_at_the_last_step_moves_latest_on_the_rerun(rel_data, tmp_path):
    """The run is killed after step_8 (its last) was renamed into place but before `latest` named it; the rerun
    resumes from step 4, trains to 8 and saves step 8 again: `latest` must name it afterwards."""
    common = ["train.max_steps=8", "train.save_every=4", "train.log_every=100"]
    run_killed(rel_data, tmp_path / "run", "before_latest:8", *common)
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "step_00000008" / "mlmm_state.json").is_file() and (ckpt / "latest").read_text() == "step_00000004"
    trainer = Trainer(load_config(TINY, overrides(rel_data, tmp_path / "run", *common))).setup()
    assert trainer.step == 4
    trainer.train()
    trainer.cleanup()
    assert (ckpt / "latest").read_text() == "step_00000008"


def _rewrite_tar(path: Path, mutate) -> None:
    """Rewrite a shard, passing each (name, bytes) through `mutate` (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            data = mutate(name, data)
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_data_is_skipped_counted_and_thresholded(rel_data, tmp_path, caplog):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(rel_data / "shards", shards)
    files = sorted(shards.glob("*.tar"))
    broken = {"jpg": 0, "mp4": 0, "wav": 0, "json": 0}

    def mutate(name, data):
        key, ext = name.split(".", 1)
        n = int(key.split("-")[1])
        if n % 10 not in (3, 7):  # ~20 % of the samples are broken: media at 3, json at 7
            return data
        if ext in ("jpg", "mp4", "wav") and n % 10 == 3:
            broken[ext] += 1
            return b"\x00garbage" + data[: len(data) // 10]
        if ext == "json" and n % 10 == 7:
            broken["json"] += 1
            meta = json.loads(data)
            kind = (n // 10) % 4
            if kind == 0:
                return b"{not json"
            if kind == 1:
                meta["captions"] = {"en": ["  "]}  # empty captions
            if kind == 2:
                meta["captions"] = {"klingon!": ["qapla"]}  # unknown language code
            if kind == 3:
                meta.pop("captions")  # missing key
                meta["unexpected"] = 1
            return json.dumps(meta).encode()
        return data

    for f in files[:-1]:
        _rewrite_tar(f, mutate)
    last = files[-1].read_bytes()
    files[-1].write_bytes(last[: len(last) // 2])  # a truncated tar
    common = [f"data.train_shards={shards}", "train.max_steps=16", "train.log_every=8", "train.save_every=8"]
    trainer, _ = run_in_process(rel_data, tmp_path / "ok", *common, "data.max_bad_fraction=0.4")
    state = json.loads((tmp_path / "ok" / "checkpoints" / "step_00000016" / "mlmm_state.json").read_text())
    reasons = state["bad_samples"]
    assert reasons.get("truncated shard", 0) > 0
    for reason in ("undecodable image", "bad json", "unknown language code", "empty captions"):
        assert reasons.get(reason, 0) > 0, (reason, reasons)
    assert sum(broken.values()) > 0
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run_in_process(rel_data, tmp_path / "strict", *common, "data.max_bad_fraction=0.01")


def test_nan_loss_skips_the_update_and_aborts_after_patience(rel_data, tmp_path):
    cfg = load_config(TINY, overrides(rel_data, tmp_path / "nan", "train.max_steps=6", "train.nan_patience=3"))
    trainer = Trainer(cfg).setup()
    real_forward = trainer.engine.module.loss.forward
    poisoned = {3}

    def forward(outputs, batch):
        out = real_forward(outputs, batch)
        if trainer.step + 1 in poisoned:
            out["loss"] = out["loss"] * float("nan")
        return out

    trainer.engine.module.loss.forward = forward
    before = {}

    def snapshot():
        return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}

    it = iter(trainer.loader)
    for step in range(1, 5):
        if step == 3:
            before = snapshot()
        trainer.train_step(next(it))
        if step == 3:
            after = snapshot()
            for k in before:
                assert torch.equal(before[k], after[k]), k  # no update on the NaN step
        trainer.step += 1
    assert trainer.skipped_steps == 1 and trainer.bad_steps == 0
    poisoned.update(range(5, 20))
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .*loss"):
        for _ in range(4):
            trainer.train_step(next(it))
            trainer.step += 1
    trainer.cleanup()


@pytest.mark.parametrize("zero", [2, 0])
def test_nan_gradient_skips_the_update(rel_data, tmp_path, zero):
    """A finite loss whose gradient is NaN: DeepSpeed's norm check skips the step (ZeRO-0 in fp32, where DeepSpeed
    has none: mlmm's own check on the optimizer); we count it."""
    trainer = Trainer(load_config(TINY, overrides(rel_data, tmp_path / "nangrad", "train.max_steps=3",
                                                  f"train.zero_stage={zero}"))).setup()
    p = trainer.engine.module.model.proj["image"].weight
    handle = p.register_hook(lambda g: g * float("nan"))
    before = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.train_step(next(iter(trainer.loader)))
    handle.remove()
    assert trainer.skipped_steps == 1
    for k, v in trainer.engine.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    trainer.cleanup()


@pytest.mark.parametrize("world,policy,shuffle", [(1, "all_languages", 20), (3, "random_language", 7),
                                                  (8, "all_languages", 0)])
def test_stream_resumes_exactly_at_every_batch(rel_data, world, policy, shuffle):
    """Cheap check of the data position alone: resuming after batch k gives batches k+1.. of the full stream.

    world=8 > 8 shards' worth of slots exercises the per-sample split; all_languages splits samples
    across batch boundaries (the `used` part of the position).
    """
    import itertools

    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.shards import resolve_shards
    from mlmm.data.tokenization import load_tokenizer
    from mlmm.data.train_stream import TrainStream

    cfg = load_config(TINY, overrides(rel_data, rel_data / "unused", f"data.language_policy={policy}",
                                      f"data.shuffle_buffer={shuffle}", "data.batch_size=5"))
    cfg.model.video = cfg.model.audio = None  # keys are what matters: decode images + text only
    pre = Preprocessor(cfg.model, load_tokenizer(rel_data / "tok"), train=True)
    shards = resolve_shards(cfg.data.train_shards)
    rank = world - 1
    full = list(itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=rank, world_size=world)), 14))
    for k in (0, 3, 8):
        st = full[k].data_state
        state = {"slots": {str(st["slot"]): {x: st[x] for x in ("emitted", "used", "skipped")}}}
        resumed = itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=rank, world_size=world, state=state)),
                                   3)
        for got, want in zip(resumed, full[k + 1:k + 4]):
            assert (got.keys, got.lang) == (want.keys, want.lang)
            assert torch.equal(got.text_ids, want.text_ids)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 3), (3, 2)])
def test_layout_change_resplits_the_rest_of_the_pass(rel_data, old_world, new_world):
    """World size changes mid-epoch: the samples the old ranks had not consumed are dealt to the new
    ranks, so within the pass none is seen twice and none is skipped; the new order is deterministic."""
    import itertools

    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.shards import resolve_shards
    from mlmm.data.resplit import build_source
    from mlmm.data.tokenization import load_tokenizer
    from mlmm.data.train_stream import LoaderState, TrainStream

    # (buffer 10: every old slot is still inside its first epoch, so `seen` holds epoch-0 samples only)
    cfg = load_config(TINY, overrides(rel_data, rel_data / "unused", "data.shuffle_buffer=10", "data.batch_size=5"))
    pre = Preprocessor(cfg.model, load_tokenizer(rel_data / "tok"), train=True)
    shards = resolve_shards(cfg.data.train_shards)
    seen, ranks = [], []
    for rank in range(old_world):  # each old rank consumes a different number of batches
        state = LoaderState(0)
        for b in itertools.islice(iter(TrainStream(shards, cfg.data, pre, rank=rank, world_size=old_world)), 2 + rank):
            seen += b.keys
            state.update(b)
        ranks.append(state.to_dict())
    old = {"world_size": old_world, "num_workers": 1, "ranks": ranks}
    record = {"from": old, "seed": cfg.data.seed, "buffer_size": cfg.data.shuffle_buffer}

    rest = []
    for slot in range(new_world):
        source = build_source(shards, seed=cfg.data.seed, slot=slot, n_slots=new_world, resplit=record)
        rest += [raw["__key__"] for _, raw in itertools.islice(source.read(0), len(source.prefix))]
        again = build_source(shards, seed=cfg.data.seed, slot=slot, n_slots=new_world, resplit=record)
        assert again.prefix == source.prefix  # a pure function of the checkpoint
    everything = [raw["__key__"] for raw in build_source(shards, seed=0, slot=0, n_slots=1).plan.epoch_samples(0, 0)]
    assert len(seen) + len(rest) == len(everything)  # nothing twice ...
    assert sorted(seen + rest) == sorted(everything)  # ... nothing skipped

    # the training stream of a new rank starts with its share and then goes on with the new layout's epochs
    state = {"slots": {}, "next_role": 0, "resplit": record}
    stream = TrainStream(shards, cfg.data, pre, rank=0, world_size=new_world, state=state)
    first = next(iter(stream))
    assert len(first) == 5 and first.data_state["emitted"] >= 5


@pytest.mark.parametrize("zero", [2, 3])
def test_resume_on_fewer_processes(rel_data, tmp_path, zero):
    """torchrun with 2 processes writes a ZeRO checkpoint; one process resumes it through DeepSpeed's universal
    checkpoint: weights equal the consolidated fp32 weights, Adam moments survive, training and data go on."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mlmm.training.engine import full_state_dict

    out = tmp_path / "run"
    extra = (f"train.zero_stage={zero}", "train.max_steps=4")
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(MLMM_CPU_SHM_ALLREDUCE="0", OMP_NUM_THREADS="1")  # plain gloo: no 1-min kernel build in CI
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "recipes" / "train.py"),
           "--config", str(TINY), *overrides(rel_data, out, *extra), "--no-export"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "checkpoints" / "step_00000004" / "mlmm_state.json").read_text())
    assert saved["world_size"] == 2
    want = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000004")

    trainer = Trainer(load_config(TINY, overrides(rel_data, out, *extra))).setup()
    assert trainer.step == 4 and trainer.resumed_state["resharded_from"] == 2
    got = full_state_dict(trainer.engine, trainer.model)
    for k, v in got.items():
        assert torch.equal(v.float(), want[f"model.{k}"].float()), k
    moments = [s for s in trainer.engine.optimizer.optimizer.state.values() if "exp_avg" in s]
    assert moments and all(float(s["exp_avg"].norm()) > 0 for s in moments)  # not a fresh optimizer
    trainer.cfg.train.max_steps = 7
    trainer.train()
    trainer.cleanup()
    assert trainer.step == 7 and len(trainer.losses) == 3 and all(map(lambda x: x == x, trainer.losses))
    state = json.loads((out / "checkpoints" / "step_00000007" / "mlmm_state.json").read_text())
    assert state["world_size"] == 1 and "resplit" in state["data"]["ranks"][0]


def test_unsupported_language_in_the_tokenizer_is_named(rel_data, tmp_path):
    """Thai captions under a tokenizer trained on en/de/fr only: stop at once, naming the language."""
    from mlmm.data.write_shards import iter_jsonl, write_shards

    rows = [row for _, row in iter_jsonl(rel_data / "gen" / "manifest.jsonl") if "image" in row][:24]
    thai = ["วงกลมสีแดงบนพื้นหลัง", "สี่เหลี่ยมสีน้ำเงิน", "สามเหลี่ยมสีเขียวขนาดเล็ก"]
    manifest = tmp_path / "manifest.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            row = {**row, "image": str(rel_data / "gen" / row["image"]), "captions": {"th": [thai[i % 3]]}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_shards(manifest, tmp_path / "shards", shard_size=12, progress=False)
    cfg = load_config(TINY, overrides(rel_data, tmp_path / "run", f"data.train_shards={tmp_path / 'shards'}",
                                      "loss.pairs=[[image,text]]"))
    cfg.model.video = cfg.model.audio = None
    trainer = Trainer(cfg).setup()
    with pytest.raises(ValueError, match=r"language 'th' is not supported by the tokenizer .*tok.*data.languages"):
        trainer.train()
    assert trainer.step == 0  # caught before the first update
    trainer.cleanup()


def test_out_of_memory_says_which_batch_size_to_lower(rel_data, tmp_path, monkeypatch):
    trainer = Trainer(load_config(TINY, overrides(rel_data, tmp_path / "run"))).setup()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer.engine, "forward", oom)
    with pytest.raises(RuntimeError, match=r"out of memory at step 1 with data.batch_size=8 .*data.batch_size=4") as e:
        trainer.train()
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    trainer.cleanup()
