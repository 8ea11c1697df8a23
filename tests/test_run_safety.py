"""One run per output folder, checked resumes, opt-in unpickling (issue 18 parts 2, 3, 7).

Every refusal is checked for its exit code / exception, a one-line message naming the culprit, and that the files
of the run already in the folder are byte-identical afterwards.
"""
import hashlib
import json
import os
import runpy
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_data

from mlmm.config import TrainConfig, load_config
from mlmm.training import Trainer, resume, run_identity
from mlmm.training.errors import CheckpointRefused, OutputDirInUse, ResumeMismatch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_clip.yaml"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_data(tmp_path_factory.mktemp("safety_data"), n_images=24, n_videos=8, n_audio=16,
                           shard_size=12, seed=3)


def args(data: Path, out: Path, *extra) -> list[str]:
    return [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}", f"output_dir={out}",
            f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.warmup_steps=1",
            "data.batch_size=4", "data.shuffle_buffer=8", "train.max_steps=4", "train.save_every=2",
            "train.log_every=1", *extra]


def setup(data, out, *extra) -> Trainer:
    return Trainer(load_config(TINY, args(data, out, *extra))).setup()


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("first") / "run"
    trainer = setup(data, out)
    trainer.train()
    trainer.cleanup()
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    return out


@pytest.fixture
def run(first_run, tmp_path):
    """A copy of the finished run (a moved output folder is the same run)."""
    dst = tmp_path / "run"
    shutil.copytree(first_run, dst)
    return dst


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_cli(argv, capsys) -> tuple[int, str]:
    """recipes/train.py main() in this process -> (exit code, stderr)."""
    main = runpy.run_path(str(REPO / "recipes" / "train.py"))["main"]
    code = main(["--config", str(TINY), *argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and "[WARNING]" not in x]  # (DeepSpeed's accelerator notice)
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------- part 2: the lock
def test_a_live_run_holds_the_folder_and_a_dead_ones_lock_is_taken_over(data, run, capsys, caplog):
    before = hashes(run)
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from mlmm.training.runlock import acquire
        acquire(Path(sys.argv[1]))
        print("holding", flush=True)
        sys.stdin.read()
    """)
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        lock = json.loads((run / "run.lock").read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        held = hashes(run)
        status, err = train_cli(args(data, run, "train.max_steps=6"), capsys)
        assert status == 3
        line = one_line(err)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line and str(run) in line, line
        assert hashes(run) == held  # log, checkpoints, export, config.json and the lock itself untouched
    finally:
        holder.kill()
        holder.wait()
    assert (run / "run.lock").is_file()  # SIGKILL: the dead holder's lock stays behind ...
    trainer = setup(data, run)  # ... and is taken over, with a warning naming it
    assert f"took over the stale lock of pid {holder.pid}" in caplog.text
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    trainer.cleanup()
    assert not (run / "run.lock").exists()
    for sub in ("checkpoints", "export"):  # resumed at max_steps, not trained: nothing of the run rewritten
        assert {k: v for k, v in hashes(run).items() if k.startswith(sub)} == \
            {k: v for k, v in before.items() if k.startswith(sub)}


def test_a_lock_from_another_host_refuses_and_says_how_to_override(data, run, capsys):
    (run / "run.lock").write_text(json.dumps({"pid": 4242, "host": "gpu-node-17", "started": "2026-01-01 00:00:00",
                                              "command": "recipes/train.py"}))
    before = hashes(run)
    status, err = train_cli(args(data, run), capsys)
    line = one_line(err)
    assert status == 3
    assert "pid 4242 on host gpu-node-17" in line and f"delete {run / 'run.lock'}" in line, line
    assert hashes(run) == before


def test_an_uncleaned_trainer_of_this_process_holds_its_folder(data, run):
    first = setup(data, run)
    with pytest.raises(OutputDirInUse, match=rf"pid {os.getpid()} .*this process.*cleanup\(\)"):
        setup(data, run)
    first.cleanup()
    setup(data, run).cleanup()  # free again


def test_every_rank_learns_of_the_refusal_without_hanging(tmp_path):
    """2 gloo processes: rank 0 is refused the lock; both raise the same one-line error and exit."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    code = textwrap.dedent("""
        import sys
        import torch.distributed as dist
        from pathlib import Path
        from mlmm.training import distributed, runlock
        rank, port, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            distributed.main_decides(lambda: runlock.acquire(out)[1])
        except runlock.OutputDirInUse as e:
            print(f"rank {rank}: {e}", flush=True)
            distributed.cleanup()  # every rank is refused alike, so the barrier is reached (gloo aborts without it)
            sys.exit(3)
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if k not in DIST_VARS}, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs
    for r, (stdout, _) in enumerate(outs):
        assert stdout.startswith(f"rank {r}: output_dir {out} is in use by pid 1 on host elsewhere"), stdout


# ----------------------------------------------------------------------------------- part 3: resume checks
@pytest.mark.parametrize("change,named", [
    (["seed=1", "data.batch_size=2"], ["seed: 0 -> 1", "data.batch_size: 4 -> 2"]),
    (["model.embed_dim=16", "loss.pairs=[[image,text]]"], ["model.embed_dim: 32 -> 16", "loss.pairs:"]),
    (["train.grad_accum=2", "data.shuffle_buffer=4"], ["train.grad_accum: 1 -> 2", "data.shuffle_buffer: 8 -> 4"]),
])
def test_a_changed_run_is_refused_naming_the_keys(data, run, capsys, change, named):
    before = hashes(run)
    status, err = train_cli(args(data, run, *change), capsys)
    line = one_line(err)
    assert status == 3 and "belongs to another run" in line and "train.resume=force" in line, line
    for key in named:
        assert key in line, (key, line)
    assert hashes(run) == before


def test_other_shards_or_another_tokenizer_are_refused_a_moved_copy_is_not(data, run, tmp_path):
    from mlmm.data.tokenization import train_tokenizer

    moved = tmp_path / "moved_shards"
    shutil.copytree(data / "shards", moved)
    fewer = tmp_path / "fewer_shards"
    shutil.copytree(data / "shards", fewer)
    index = json.loads((fewer / "index.json").read_text())
    *index["shards"], dropped = index["shards"]
    (fewer / dropped["name"]).unlink()  # a consistent folder with one shard less
    index["n_samples"] -= dropped["n"]
    (fewer / "index.json").write_text(json.dumps(index))
    with pytest.raises(ResumeMismatch, match=r"data.train_shards: \d+ shards / \d+ samples .* -> \d+ shards"):
        setup(data, run, f"data.train_shards={fewer}")
    train_tokenizer(["a red circle", "ein blaues Quadrat", "un triangle vert"] * 20, tmp_path / "tok2", vocab_size=120)
    with pytest.raises(ResumeMismatch, match=r"model.text.tokenizer: another vocabulary"):
        setup(data, run, f"model.text.tokenizer={tmp_path / 'tok2'}")
    shutil.copytree(data / "tok", tmp_path / "tok_copy")
    moved_args = (f"data.train_shards={moved}", f"model.text.tokenizer={tmp_path / 'tok_copy'}")
    plan = resume.plan(load_config(TINY, args(data, run, *moved_args)), run / "checkpoints",
                       _record(data, run, *moved_args), world=1)
    assert plan.tag == "step_00000004"
    for key in ("data.train_shards", "model.text.tokenizer"):
        assert any(e.startswith(key) and "same content" in e for e in plan.edits), (key, plan.edits)


def _record(data, run, *extra):
    import torch

    from mlmm.training.engine import build_ds_config
    from mlmm.training.trainer import load_tokenizer

    cfg = load_config(TINY, args(data, run, *extra))
    return run_identity.run_record(cfg, load_tokenizer(cfg), build_ds_config(cfg, torch.device("cpu")))


def test_legitimate_edits_are_applied_and_logged(data, run, caplog):
    """lr, the schedule and AdamW's weight decay change on resume: the restored optimizer uses the new values
    (before, the checkpoint's lr stayed in force while config.json showed the new one)."""
    from mlmm.training.schedule import warmup_cosine

    trainer = setup(data, run, "train.max_steps=8", "train.lr=1e-3", "train.min_lr_ratio=0.1",
                    "train.weight_decay=0.2", "train.save_every=3", "train.log_every=2")
    assert trainer.step == 4
    groups = trainer.engine.optimizer.param_groups
    want = 1e-3 * warmup_cosine(4, warmup_steps=1, max_steps=8, min_lr_ratio=0.1)
    assert trainer.engine.get_lr()[0] == pytest.approx(want, rel=1e-9)
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    applied = next(r.getMessage() for r in caplog.records if "config edits applied on resume" in r.getMessage())
    for edit in ("train.lr: 0.002 -> 0.001", "train.max_steps: 4 -> 8", "train.min_lr_ratio: 0.0 -> 0.1",
                 "train.weight_decay: 0.05 -> 0.2", "train.save_every: 2 -> 3", "output_dir:"):
        assert edit in applied, (edit, applied)
    history = trainer.train()
    trainer.cleanup()
    lrs = {h["step"]: h["lr"] for h in history}
    assert lrs[6] == pytest.approx(1e-3 * warmup_cosine(6, warmup_steps=1, max_steps=8, min_lr_ratio=0.1))
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 1e-3
    assert (run / "checkpoints" / "step_00000006").is_dir()  # the new save_every=3


def test_force_resumes_a_changed_run_and_logs_the_diff_load_errors_are_one_line(data, run, caplog):
    trainer = setup(data, run, "train.resume=force", "data.batch_size=2")
    assert trainer.step == 4 and trainer.cfg.data.batch_size == 2
    assert any("train.resume=force" in r.getMessage() and "data.batch_size: 4 -> 2" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    trainer.cleanup()
    before = hashes(run)
    with pytest.raises(CheckpointRefused, match=r"step_00000004: DeepSpeed could not load it \(RuntimeError: .*"):
        setup(data, run, "train.resume=force", "model.embed_dim=16")  # the weights cannot fit: refused, no traceback
    after = hashes(run)
    assert after.pop("train.log") != before.pop("train.log")  # (the log records the forced attempt)
    assert after == before


def test_run_identity_world_size_and_new_fields(data, tmp_path):
    """The layout may change when the data position can be re-split; a field added later at its default is no
    change; an unclassified key is refused."""
    cfg = load_config(TINY, args(data, tmp_path))
    record = {"config": json.loads(json.dumps(cfg.to_dict())), "shards": {"n": 2, "samples": 10, "digest": "d"},
              "parallel_jsonl": None, "tokenizer": None, "precision": "fp32", "zero_stage": 2}

    def compare(saved, **kw):
        return run_identity.compare(saved, record, cfg, **{"saved_world": 1, "world": 1, "resplit_possible": True,
                                                            **kw})

    assert compare(record) == ([], [])
    assert compare(record, saved_world=2)[1] == [
        "world size: 2 -> 1 (weights and optimizer through a universal checkpoint, the rest of the pass re-split)"]
    refused, _ = compare(record, saved_world=2, resplit_possible=False)
    assert refused and "world size x data.num_workers: 2 x 1 -> 1 x 1" in refused[0]
    older = json.loads(json.dumps(record))
    del older["config"]["train"]["nan_patience"]  # a field this checkpoint's mlmm did not have yet
    assert compare(older) == ([], [])
    older["config"]["data"]["some_new_knob"] = 3  # a key no list classifies
    refused, _ = compare(older)
    assert refused == ["data.some_new_knob: 3 -> (unset) (not classified in mlmm/training/run_identity.py)"]
    stage = json.loads(json.dumps(record))
    stage["zero_stage"] = 3
    assert compare(stage)[0] == ["train.zero_stage: 3 -> 2"]
    jsonl = json.loads(json.dumps(record))
    jsonl["parallel_jsonl"] = "0123abcd"  # shards prepared from another parallel-caption file
    assert compare(jsonl)[0] == ["data.parallel_jsonl: another file content (sha1)"]


def test_every_config_key_is_classified_once():
    import dataclasses

    from mlmm.config import DataConfig, RunConfig

    assert not set(run_identity.IDENTITY) & set(run_identity.EDITABLE)
    sections = {"": RunConfig, "data.": DataConfig, "train.": TrainConfig}
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            key = prefix + f.name
            if key in ("data", "train", "config_path"):
                continue
            assert run_identity.classify(key), (f"{key}: classify it in mlmm/training/run_identity.py (IDENTITY: it "
                                                "makes another run; EDITABLE: a resumed run applies it)")
    assert run_identity.classify("model.heads.fuse.layers") == "identity"
    assert run_identity.classify("loss.anything") == "identity"


def _damage(ckpt: Path, how: str) -> str:
    if how == "bad .pt":
        p = ckpt / "mp_rank_00_model_states.pt"
        b = bytearray(p.read_bytes())
        for i in range(len(b) // 2, len(b) // 2 + 64):
            b[i] ^= 0xFF
        p.write_bytes(bytes(b))
        return "mp_rank_00_model_states.pt is corrupt"
    if how == "truncated .pt":
        p = ckpt / "mp_rank_00_model_states.pt"
        p.write_bytes(p.read_bytes()[:1000])
        return "mp_rank_00_model_states.pt has 1000 bytes"
    if how == "missing optimizer file":
        (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
        return "missing zero_pp_rank_0_mp_rank_00_optim_states.pt"
    p = ckpt / "mlmm_state.json"
    p.write_text(p.read_text()[:100])
    return "mlmm_state.json is unreadable"


@pytest.mark.parametrize("how", ["truncated .pt", "missing optimizer file", "unreadable mlmm_state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(data, run, how):
    root = run / "checkpoints"
    why = _damage(root / "step_00000004", how)
    damaged, previous = hashes(root / "step_00000004"), hashes(root / "step_00000002")
    cfg = load_config(TINY, args(data, run))
    plan = resume.plan(cfg, root, _record(data, run), world=1)
    assert plan.tag == "step_00000002"
    assert any(why in n and "step_00000004" in n and "damaged_step_00000004" in n for n in plan.notes), plan.notes
    assert hashes(root / "damaged_step_00000004") == damaged  # kept, out of the way of the next save
    assert hashes(root / "step_00000002") == previous and (root / "latest").read_text() == "step_00000002"


def test_a_bad_pt_falls_back_and_training_goes_on(data, run, caplog):
    root = run / "checkpoints"
    why = _damage(root / "step_00000004", "bad .pt")
    trainer = setup(data, run, "train.max_steps=5")
    assert trainer.step == 2
    assert any(why in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    trainer.train()
    trainer.cleanup()
    assert (root / "latest").read_text() == "step_00000005" and (root / "step_00000004" / "mlmm_state.json").is_file()


def test_no_sound_checkpoint_is_refused_never_a_silent_start_over(data, run, capsys):
    root = run / "checkpoints"
    _damage(root / "step_00000004", "bad .pt")
    _damage(root / "step_00000002", "missing optimizer file")
    before = hashes(run)
    status, err = train_cli(args(data, run), capsys)
    line = one_line(err)
    assert status == 3 and f"no checkpoint in {root} can be resumed" in line and "step_00000002: missing" in line
    assert hashes(run) == before
    with pytest.raises(CheckpointRefused, match=r"train.resume=step_00000004: .* is damaged: .*corrupt"):
        setup(data, run, "train.resume=step_00000004")
    with pytest.raises(CheckpointRefused, match=r"train.resume=never, but .* holds checkpoints of an earlier run"):
        setup(data, run, "train.resume=never")
    assert hashes(run) == before


def test_resume_from_latest_when_the_latest_file_is_missing(data, run):
    (run / "checkpoints" / "latest").unlink()
    plan = resume.plan(load_config(TINY, args(data, run)), run / "checkpoints", _record(data, run), world=1)
    assert plan.tag == "step_00000004" and any("latest is missing" in n for n in plan.notes)


# ------------------------------------------------------------------------------- part 7: unpickling is opt-in
@pytest.mark.parametrize("how", ["no fingerprint", "a file mlmm did not write"])
def test_files_mlmm_did_not_write_are_refused_unless_trusted(data, run, capsys, caplog, how):
    ckpt = run / "checkpoints" / "step_00000004"
    if how == "no fingerprint":
        state = json.loads((ckpt / "mlmm_state.json").read_text())
        del state["files"]
        (ckpt / "mlmm_state.json").write_text(json.dumps(state))
        culprit = "no file fingerprint"
    else:
        (ckpt / "extra_states.pt").write_bytes(b"not written by mlmm")
        culprit = "holds files mlmm did not write: extra_states.pt"
    before = hashes(run)
    status, err = train_cli(args(data, run), capsys)
    line = one_line(err)
    assert status == 3 and culprit in line and "step_00000004" in line, line
    assert "weights_only=False" in line and "train.trust_checkpoint=true" in line
    assert hashes(run) == before
    trainer = setup(data, run, "train.trust_checkpoint=true")  # the explicit opt-in
    assert trainer.step == 4
    trainer.cleanup()


# ------------------------------------------------------------------------------------- save_every default
def test_every_recipe_saves_periodically():
    assert TrainConfig().save_every > 0
    for path in sorted((REPO / "recipes" / "configs").glob("*.yaml")):
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        assert train.get("save_every", TrainConfig().save_every) > 0, path.name
