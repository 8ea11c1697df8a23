"""Cluster correctness on CPU: 2 processes over gloo, started the way srun (or torchrun) starts them.

One 2-process job runs the scenarios of tests/cluster_run.py (a rank without a modality, gradient accumulation,
bf16, per-rank randomness, host syncs, fsyncs); two more inject a fault on rank 1. A hang fails through the
timeout. Set MLMM_CPU_SHM_ALLREDUCE=0: plain gloo, no 85-s kernel build.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "cluster_run.py"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
TIMEOUT = 300  # a hang becomes a failure


def free_port(low: int = 20000, high: int = 40000) -> int:
    """A free local port in [low, high) (srun style: mlmm derives the port from the job id into this range)."""
    import random

    for port in random.Random().sample(range(low, high), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def launch(data: Path, out: Path, what: str, style: str) -> list[dict]:
    """Start 2 processes of the driver; ``style`` slurm: only SLURM_* variables (as srun sets them, the port from
    the job id), torchrun: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*. -> [{rc, stderr, exited_at}] per rank."""
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    base.update(MLMM_CPU_SHM_ALLREDUCE="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    port = free_port()
    procs = []
    for rank in range(2):
        if style == "slurm":
            env = {**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
                   "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 20000)}
        else:
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), str(data), str(out), what], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results, deadline = [None, None], time.time() + TIMEOUT
    while any(r is None for r in results):
        for i, p in enumerate(procs):
            if results[i] is None and p.poll() is not None:
                results[i] = {"exited_at": time.time()}
        if time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"{what}: the 2-process job hung (no exit within {TIMEOUT} s)")
        time.sleep(0.05)
    for r, p in zip(results, procs):
        r.update(rc=p.returncode, stderr=p.stderr.read())
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cluster_run import make_data

    root = tmp_path_factory.mktemp("cluster_data")
    make_data(root)
    return root


@pytest.fixture(scope="module")
def job(data, tmp_path_factory):
    """The scenarios, in one 2-process job started with Slurm-style variables only."""
    out = tmp_path_factory.mktemp("cluster_job")
    procs = launch(data, out, "mixed,accum,bf16", "slurm")
    for rank, p in enumerate(procs):
        assert p["rc"] == 0, f"rank {rank}:\n{p['stderr'][-4000:]}"
    return out


def results(out: Path, scenario: str) -> list[dict]:
    return [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------ 3: launchers
def test_ranks_come_from_slurm_variables(job):
    """srun sets SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, no RANK: two ranks of one world, not two
    rank-0 worlds."""
    got = results(job, "mixed")
    assert [(r["rank"], r["world"]) for r in got] == [(0, 2), (1, 2)]


def test_world_info_from_each_launcher():
    from mlmm.training.distributed import export_world_env, first_host, world_info_from_env

    assert world_info_from_env({}) == ("none", 0, 1, 0)
    assert world_info_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                                "SLURM_STEP_NUM_TASKS": "2"}) == ("torchrun/deepspeed", 3, 8, 1)  # torchrun in srun
    assert world_info_from_env({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16",
                                "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == ("Open MPI", 5, 16, 1)
    assert world_info_from_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"})[1:] == (2, 4, 0)
    # an sbatch script itself (no srun step): one process, not SLURM_NTASKS ranks
    assert world_info_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"})[0] == "none"
    assert first_host("gpu[003-005,9],cpu1") == "gpu003" and first_host("node7") == "node7"
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "123",
           "SLURM_STEP_NODELIST": "n[10-11]"}
    assert export_world_env(env) == "srun"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "4", "1", "n10", "20123")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):  # mpirun without the rendezvous address
        export_world_env({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


# ------------------------------------------------------------------------------------ 1: a rank without a modality
def concat(b0, b1):
    """One batch holding the rows of both (text padded to the longer length)."""
    from mlmm.data.batch import Batch

    def pad(t, length):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]))

    length = max(b0.text_ids.shape[1], b1.text_ids.shape[1])
    fields = {"keys": b0.keys + b1.keys, "lang": b0.lang + b1.lang, "meta": b0.meta + b1.meta,
              "captions": b0.captions + b1.captions,
              "text_ids": torch.cat([pad(b0.text_ids, length), pad(b1.text_ids, length)]),
              "text_attention": torch.cat([pad(b0.text_attention, length), pad(b1.text_attention, length)])}
    for name in ("image", "video", "audio"):
        fields[name] = torch.cat([getattr(b0, name), getattr(b1, name)])
    for name in ("image_mask", "video_mask", "audio_mask", "text_mask"):
        fields[name] = torch.cat([getattr(b0, name), getattr(b1, name)])
    return Batch(**fields)


def test_rank_without_a_modality_trains_and_matches_one_process(job, data):
    """Rank 0 reads an image-only shard, rank 1 an audio-only one: no hang, and the mean of the ranks' losses and
    gradients (what DeepSpeed applies) equal one process's over both ranks' rows."""
    from cluster_run import config

    from mlmm.models.model import MultimodalModel
    from mlmm.registry import LOSSES
    from mlmm.training.engine import TrainModule
    from mlmm.training.trainer import load_tokenizer

    got = results(job, "mixed")
    assert [r["steps"] for r in got] == [[4, 4], [4, 4]]
    assert sorted(r["modalities_seen"][0] for r in got) == ["audio", "image"]
    assert all(len(r["modalities_seen"]) == 1 for r in got)  # each rank saw one modality only
    ranks = [torch.load(job / f"mixed_rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["batch"].has("image") != ranks[1]["batch"].has("image")
    cfg = config(data, job / "unused", "mixed", "loss.pairs=[[image,text],[audio,text]]")
    model = MultimodalModel(cfg.model, load_tokenizer(cfg))
    plain = TrainModule(model, LOSSES.get("contrastive").cls(cfg.loss, model.modalities))
    plain.load_state_dict(ranks[0]["state"])
    plain.eval()
    terms = plain(concat(ranks[0]["batch"], ranks[1]["batch"]))
    terms["loss"].backward()
    for k, v in terms.items():
        torch.testing.assert_close((ranks[0]["terms"][k] + ranks[1]["terms"][k]) / 2, v.detach(), rtol=1e-5,
                                   atol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    for n, g in grads.items():
        torch.testing.assert_close((ranks[0]["grads"][n] + ranks[1]["grads"][n]) / 2, g, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ 6: per-rank randomness
def test_ranks_draw_different_random_numbers_and_resume_exactly(job):
    got = results(job, "mixed")
    assert got[0]["draws"]["torch"] != got[1]["draws"]["torch"]  # e.g. CMMAE's patch masks (torch.rand)
    assert got[0]["draws"]["python"] != got[1]["draws"]["python"]  # ASCL / MVSEN caption edits (random)
    for r in got:  # killed after update 3, resumed from update 2: the same losses (dropout: the per-rank RNG)
        assert r["resumed_losses"] == pytest.approx(r["losses"][2:], abs=1e-6)
    ckpt = job / "run_mixed" / "checkpoints" / "step_00000002"
    states = [json.loads((ckpt / "rng" / f"rank_{r:05d}.json").read_text()) for r in range(2)]
    assert states[0]["torch"] != states[1]["torch"]


# ------------------------------------------------------------------------------------ 7: host syncs
def test_no_host_device_sync_in_the_step(job):
    """Counted on CPU: tensor reads (item / tolist / bool / int / float / nonzero / boolean indexing) made by mlmm's
    own code inside Trainer.train_step, over every step of the run. Logging reads the losses every log_every steps,
    outside the step."""
    for r in results(job, "mixed"):
        assert r["syncs"] == []


# ------------------------------------------------------------------------------------ 9: checkpoint writes
def test_each_rank_fsyncs_its_own_checkpoint_files_and_shards_are_listed_once(job):
    for rank, r in enumerate(results(job, "mixed")):
        synced = [Path(p).name for p in r["fsynced"] if "step_00000002" in p]
        assert f"rank_{rank:05d}.json" in synced  # its RNG state
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in synced  # its optimizer partition
        assert f"zero_pp_rank_{1 - rank}_mp_rank_00_optim_states.pt" not in synced  # not the other rank's
        assert r["shard_resolves"] == 0  # the shard list is resolved at setup, not at every save


# ------------------------------------------------------------------------------------ 4: gradient accumulation
def test_grad_accum_equals_a_bigger_batch_across_a_resume(job):
    """Per rank batch 8 vs 2 accumulated micro-batches of 4 (the second run stopped at update 2 and resumed):
    max_steps counts updates; losses, learning rates and weights agree to fp32 rounding."""
    for r in results(job, "accum"):
        ga1, first, resumed = r["ga1"], r["ga2_first"], r["ga2_resumed"]
        assert ga1["step"] == ga1["global_steps"] == 4 and resumed["step"] == resumed["global_steps"] == 4
        assert ga1["skipped"] == first["skipped"] == resumed["skipped"] == 0  # no micro-step counted as skipped
        assert first["losses"] + resumed["losses"] == pytest.approx(ga1["losses"], abs=1e-6)
        assert first["lr"] + resumed["lr"] == pytest.approx(ga1["lr"], abs=1e-12)
        assert ga1["samples_seen"] == resumed["samples_seen"] == 4 * 8 * 2
    a, b = torch.load(job / "accum_ga1.pt"), torch.load(job / "accum_ga2_resumed.pt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ 5, 8: bf16; few shards
def test_bf16_skips_a_nan_update_on_every_rank_and_exports_fp32_masters(job):
    got = results(job, "bf16")
    for r in got:
        assert r["dtype"] == "torch.bfloat16"
        assert r["skipped"] == 1 and r["unchanged_at_nan_step"]  # NaN gradient on rank 1 only
    assert got[0]["export_equals_masters"] and got[0]["masters_differ_from_bf16"]


def test_fewer_shards_than_reader_slots_is_a_warning_with_the_numbers(job):
    got = results(job, "bf16")
    assert any("3 shard(s) for 2 rank(s) x 3 loader slot(s) each = 6 reader slots" in w for w in got[0]["warnings"])
    assert got[1]["warnings"] == []  # said once, by rank 0


# ------------------------------------------------------------------------------------ 2: one rank fails
@pytest.mark.parametrize("kind", ["data", "oom"])
def test_one_failing_rank_stops_every_rank_within_seconds(data, tmp_path, kind):
    """data: a check on rank 1's own batch raises (the ranks decide together at the end of the update);
    oom: out of memory inside rank 1's forward pass (it leaves at once; rank 0's collective then fails)."""
    procs = launch(data, tmp_path, f"fault:{kind}", "torchrun")
    fault_at = float((tmp_path / f"fault_{kind}.time").read_text())
    for rank, p in enumerate(procs):
        assert p["rc"] == 1, (rank, p["rc"], p["stderr"][-3000:])
        assert p["exited_at"] - fault_at < 30, (rank, p["exited_at"] - fault_at)
    if kind == "data":
        assert "ValueError: injected: rank 1 cannot use its batch" in procs[1]["stderr"]
        assert "RankFailure: step 2: rank 1: ValueError: injected" in procs[0]["stderr"]
    else:
        assert "out of memory at step 2 with data.batch_size=4" in procs[1]["stderr"]
        assert "Connection" in procs[0]["stderr"]  # its all-gather partner is gone


# ------------------------------------------------------------------------------------ 8: feeding the device
def test_batch_pins_every_tensor_and_the_loader_asks_for_it(data, monkeypatch):
    """On a GPU machine DataLoader(pin_memory=True) calls Batch.pin_memory in its pinning thread; here pinning is
    recorded (CPU-only torch cannot pin)."""
    from mlmm.config import load_config
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader
    from mlmm.training.trainer import load_tokenizer

    cfg = load_config(REPO / "recipes" / "configs" / "tiny_clip.yaml",
                      [f"data.train_shards={data / 'mixed'}", f"model.text.tokenizer={data / 'tok'}",
                       "data.batch_size=4"])
    loader = build_train_loader(cfg.data, Preprocessor(cfg.model, load_tokenizer(cfg), train=True), rank=0,
                                world_size=1, pin_memory=True)
    assert loader.pin_memory
    batch = next(iter(build_train_loader(cfg.data, Preprocessor(cfg.model, load_tokenizer(cfg), train=True),
                                         rank=0, world_size=1)))
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(id(t)) or t)
    out = torch.utils.data._utils.pin_memory.pin_memory(batch)  # what the DataLoader's pinning thread runs
    tensors = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    tensors += [t for d in (batch.extras, batch.row_index) for t in d.values()]
    assert tensors and all(id(t) in pinned for t in tensors)
    assert out.keys == batch.keys and out.present == batch.present


def test_prefetcher_hands_out_batches_in_order_with_their_own_errors():
    from mlmm.data.batch import Batch
    from mlmm.training.prefetch import DevicePrefetcher

    def loader():
        for i in range(4):
            if i == 2:
                raise OSError("shard unreadable")
            yield Batch(keys=[str(i)], image=torch.full((1, 3), float(i)))

    prepared = []

    def prepare(b):
        prepared.append(b.keys[0])
        if b.keys[0] == "1":
            raise ValueError("bad language")
        return b.to("cpu")

    it = DevicePrefetcher(loader(), prepare, torch.device("cpu"))
    host, dev, err = next(it)
    assert host.keys == ["0"] and dev.keys == ["0"] and err is None
    assert prepared == ["0", "1"]  # batch 1 is fetched and prepared while batch 0's step runs
    host, dev, err = next(it)
    assert host.keys == ["1"] and dev is None and isinstance(err, ValueError)  # its error comes with it
    host, dev, err = next(it)
    assert host is None and isinstance(err, OSError)
