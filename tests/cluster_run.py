"""Driver of the multi-process cluster tests (tests/test_cluster.py): run by every rank of a 2-process CPU job.

    python tests/cluster_run.py DATA OUT SCENARIO[,SCENARIO...]    # ranks from the launcher's environment
    python tests/cluster_run.py DATA OUT fault:data|fault:oom     # recipes/train.py main() with a fault on rank 1

Each scenario trains through the real Trainer and writes ``OUT/<scenario>_rank<r>.json`` (and .pt tensors); the
tests compare them. DATA holds the data sets made by :func:`make_data`.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_clip.yaml"


def make_data(root: Path) -> None:
    """``mixed``: shard 0 image-only, shard 1 audio-only (so each of 2 ranks reads one modality);
    ``img``: 3 shards of images + captions; one tokenizer for both."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards

    rows = generate(root / "gen", n_images=80, n_videos=0, n_audio=32, size=32, seed=3, progress=False)
    images = [r for r in rows if "image" in r]
    for name, subset, size in (("mixed", images[:32] + [r for r in rows if "audio" in r], 32),
                               ("img", images[32:], 16)):
        manifest = root / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps({**r, **{m: str(root / "gen" / r[m]) for m in ("image", "audio")
                                                        if m in r}}) + "\n" for r in subset))
        write_shards(manifest, root / name, shard_size=size, progress=False)
    train_tokenizer((c for r in rows for caps in r["captions"].values() for c in caps), root / "tok", vocab_size=300)


def config(data: Path, out: Path, shards: str, *extra: str):
    from mlmm.config import load_config

    return load_config(TINY, [f"data.train_shards={data / shards}", f"model.text.tokenizer={data / 'tok'}",
                              f"output_dir={out}", f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false",
                              "data.shuffle_buffer=0", "train.warmup_steps=1", *extra])


# ---------------------------------------------------------------------------------------- a per-row loss
@dataclass
class RowCosineLossConfig:
    name: str = field(default="row_cosine", init=False)


def register_row_cosine() -> None:
    """A loss that is a mean over the global batch's rows of 1 - cos(image, text) (each rank returns its share), so
    that batch 8 per rank equals 2 x 4 accumulated, exactly."""
    import torch.distributed as dist

    from mlmm.registry import LOSSES

    if "row_cosine" in LOSSES.names():
        return

    @LOSSES.register("row_cosine", config=RowCosineLossConfig)
    class RowCosineLoss(torch.nn.Module):
        @staticmethod
        def reads(cfg, model):
            return {"image", "text"}

        def __init__(self, cfg, modalities):
            super().__init__()

        def forward(self, outputs, batch):
            valid = (batch.mask("image").to(outputs["image"].device) & batch.mask("text").to(outputs["image"].device))
            n = valid.float().sum()
            dist.all_reduce(n)
            per_row = 1 - (outputs["image"].float() * outputs["text"].float()).sum(-1)
            loss = dist.get_world_size() * (valid.float() * per_row).sum() / n
            return {"loss": loss, "row_loss": loss}


# ---------------------------------------------------------------------------------------- instruments
class SyncCounter:
    """Counts host reads of tensors made from mlmm's own code (item(), tolist(), bool/int/float(), nonzero,
    boolean-mask indexing): each is a host-device sync on a GPU. Active only inside ``counting()``."""

    METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select")

    def __init__(self):
        self.active, self.sites = False, []
        for name in self.METHODS:
            self._wrap(torch.Tensor, name)
        self._wrap(torch, "nonzero")
        real_getitem = torch.Tensor.__getitem__

        def getitem(t, index):
            idx = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self._record("bool-mask indexing")
            return real_getitem(t, index)

        torch.Tensor.__getitem__ = getitem

    def _record(self, what: str) -> None:
        frame = sys._getframe(2)
        path = frame.f_code.co_filename
        if f"{os.sep}mlmm{os.sep}" in path and f"{os.sep}tests{os.sep}" not in path:
            self.sites.append(f"{what} at {Path(path).name}:{frame.f_lineno}")

    def _wrap(self, owner, name: str) -> None:
        real = getattr(owner, name)
        counter = self

        def wrapper(*args, **kwargs):
            if counter.active:
                counter._record(name)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)


def fsync_recorder(log: list):
    real = os.fsync

    def fsync(fd):
        log.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    return fsync


# ---------------------------------------------------------------------------------------- scenarios
def scenario_mixed(data: Path, out: Path, rank: int) -> dict:
    """Rank 0 reads only images, rank 1 only audio: trains to the end (items 1, 7, 9), draws different random
    numbers per rank and resumes exactly (item 6); then one batch per rank for the single-process comparison."""
    from mlmm.training import Trainer, distributed, trainer as trainer_mod

    common = ["data.batch_size=8", "train.max_steps=4", "train.save_every=2", "train.log_every=2",
              "loss.pairs=[[image,text],[audio,text]]"]
    run = out / "run_mixed"
    tr = Trainer(config(data, run, "mixed", *common)).setup()
    draws = {"torch": torch.rand(6).tolist(), "python": random.random()}
    counter = SyncCounter()
    real_step, real_update = tr.train_step, tr.loader_state.update
    seen: set[str] = set()

    def counted_step(*args, **kwargs):
        counter.active = True
        try:
            return real_step(*args, **kwargs)
        finally:
            counter.active = False

    def update(batch):
        seen.update(m for m in ("image", "audio") if batch.has(m))
        return real_update(batch)

    tr.train_step, tr.loader_state.update = counted_step, update
    shard_calls = []
    real_resolve = trainer_mod.resolve_shards
    trainer_mod.resolve_shards = lambda spec: shard_calls.append(spec) or real_resolve(spec)
    fsyncs: list[str] = []
    real_fsync, os.fsync = os.fsync, fsync_recorder(fsyncs)
    try:
        tr.train()
    finally:
        os.fsync, trainer_mod.resolve_shards = real_fsync, real_resolve
    tr.cleanup()
    if rank == 0:  # as if killed after update 3: the latest checkpoint is update 2's
        import shutil

        from mlmm.training.checkpoint import _write_atomic

        shutil.rmtree(run / "checkpoints" / "step_00000004")
        _write_atomic(run / "checkpoints" / "latest", "step_00000002")
    distributed.barrier()
    resumed = Trainer(config(data, run, "mixed", *common)).setup()
    resumed.train()
    # one more batch per rank: loss and gradients of a plain copy of the model (eval: no dropout), for the
    # comparison with one process over both ranks' rows (the test side)
    from mlmm.models.model import MultimodalModel
    from mlmm.training.engine import TrainModule

    plain = TrainModule(MultimodalModel(resumed.cfg.model, resumed.tokenizer),
                        type(resumed.loss)(resumed.cfg.loss, resumed.model.modalities))
    state = {k: v.detach().clone() for k, v in resumed.engine.module.state_dict().items()}
    plain.load_state_dict(state)
    plain.eval()
    batch = next(iter(resumed.loader))
    terms = plain(batch)
    terms["loss"].backward()
    torch.save({"state": state, "batch": batch, "terms": {k: v.detach() for k, v in terms.items()},
                "grads": {n: p.grad.clone() for n, p in plain.named_parameters() if p.grad is not None}},
               out / f"mixed_rank{rank}.pt")
    resumed.cleanup()
    return {"rank": rank, "world": tr.world, "draws": draws, "losses": tr.losses, "resumed_losses": resumed.losses,
            "steps": [tr.step, resumed.step], "syncs": counter.sites, "shard_resolves": len(shard_calls),
            "fsynced": fsyncs, "modalities_seen": sorted(seen),
            "batch_has": {m: batch.has(m) for m in ("image", "audio")}}


def scenario_accum(data: Path, out: Path, rank: int) -> dict:
    """grad_accum 1 x batch 8 vs grad_accum 2 x batch 4 per rank (same samples), the second interrupted at update
    2 and resumed (item 4)."""
    from mlmm.training import Trainer
    from mlmm.training.engine import full_state_dict

    register_row_cosine()
    common = ["model.video=null", "model.audio=null", "model.text.arch=clip", "loss={name: row_cosine}",
              "train.log_every=1", "train.save_every=2", "train.zero_stage=2"]
    res = {}
    for name, extra, stop in (("ga1", ["data.batch_size=8", "train.grad_accum=1"], 4),
                              ("ga2_first", ["data.batch_size=4", "train.grad_accum=2"], 2),
                              ("ga2_resumed", ["data.batch_size=4", "train.grad_accum=2"], 4)):
        run = out / ("run_ga1" if name == "ga1" else "run_ga2")
        tr = Trainer(config(data, run, "img", *common, *extra, "train.max_steps=4")).setup()
        tr.cfg.train.max_steps = stop  # the first ga2 run stops (and saves) at update 2 of its 4
        tr.train()
        sd = full_state_dict(tr.engine, tr.model)
        if rank == 0:
            torch.save(sd, out / f"accum_{name}.pt")
        res[name] = {"losses": tr.losses, "lr": [h["lr"] for h in tr.history], "step": tr.step,
                     "global_steps": tr.engine.global_steps, "skipped": tr.skipped_steps,
                     "samples_seen": tr.samples_seen}
        tr.cleanup()
    return res


def scenario_bf16(data: Path, out: Path, rank: int) -> dict:
    """bf16 ZeRO-2: a NaN gradient on rank 1 alone at update 2 skips that update on both ranks; the export holds
    the fp32 master weights (item 5). 3 loader workers per rank over 3 shards: the few-shards warning (item 8)."""
    import logging

    from deepspeed.utils import safe_get_full_fp32_param

    from mlmm.hub import load_state_dict
    from mlmm.training import Trainer

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("mlmm").addHandler(Keep())
    tr = Trainer(config(data, out / "run_bf16", "img", "model.video=null", "model.audio=null",
                        "loss.pairs=[[image,text]]", "train.precision=bf16", "train.zero_stage=2",
                        "data.batch_size=4", "train.max_steps=3", "train.log_every=1", "data.num_workers=3")).setup()
    weight = tr.model.proj["image"].weight
    if rank == 1:
        weight.register_hook(lambda g: g * float("nan") if tr.step == 1 else g)
    snapshots, calls = {}, []
    real = tr.engine.step

    def step(*args, **kwargs):  # the engine's step of update 2 (one micro-batch per update)
        calls.append(1)
        state = {k: v.detach().float().clone() for k, v in tr.engine.module.state_dict().items()}
        real(*args, **kwargs)
        if len(calls) == 2:
            snapshots["before"] = state
            snapshots["after"] = {k: v.detach().float().clone() for k, v in tr.engine.module.state_dict().items()}

    tr.engine.step = step
    tr.train()
    unchanged = all(torch.equal(snapshots["before"][k], snapshots["after"][k]) for k in snapshots["before"])
    masters = {n: safe_get_full_fp32_param(p).float().cpu() for n, p in tr.model.named_parameters()}  # collective
    export = tr.export()
    tr.cleanup()
    res = {"skipped": tr.skipped_steps, "unchanged_at_nan_step": unchanged, "dtype": str(weight.dtype),
           "losses": tr.losses, "warnings": [r for r in records if "reader slots" in r]}
    if rank == 0:
        sd = load_state_dict(export / "model.safetensors")
        res["export_equals_masters"] = all(torch.equal(sd[n], m) for n, m in masters.items())
        res["masters_differ_from_bf16"] = any(
            not torch.equal(m, p.detach().float().cpu()) for (n, m), p in zip(masters.items(), tr.model.parameters()))
    return res


def run_fault(data: Path, out: Path, kind: str, rank: int) -> int:
    """recipes/train.py main() (its real error path) with a fault on rank 1 at update 2 (item 2)."""
    import importlib.util

    from mlmm.training import Trainer

    real_setup = Trainer.setup

    def setup(self):
        real_setup(self)
        if rank != 1:
            return self
        stamp = out / f"fault_{kind}.time"
        if kind == "data":  # a check that looks at this rank's data alone
            from mlmm.training import guards

            calls = []
            real_check = guards.LanguageCoverage.check

            def check(cov, batch):
                calls.append(1)
                if len(calls) == 2:
                    stamp.write_text(str(time.time()))
                    raise ValueError("injected: rank 1 cannot use its batch")
                return real_check(cov, batch)

            guards.LanguageCoverage.check = check
        else:  # out of memory inside the forward pass
            real_forward = self.engine.forward
            calls = []

            def forward(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    stamp.write_text(str(time.time()))
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
                return real_forward(*args, **kwargs)

            self.engine.forward = forward
        return self

    Trainer.setup = setup
    spec = importlib.util.spec_from_file_location("train_recipe", REPO / "recipes" / "train.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    run = getattr(recipe, "cli", recipe.main)
    return run(["--config", str(TINY), f"data.train_shards={data / 'img'}", f"model.text.tokenizer={data / 'tok'}",
                        f"output_dir={out / ('run_fault_' + kind)}", f"train.ds_config={REPO / 'ds_config.json'}",
                        "train.progress=false", "model.video=null", "model.audio=null", "loss.pairs=[[image,text]]",
                        "data.batch_size=4", "train.max_steps=5", "--no-export"])


SCENARIOS = {"mixed": scenario_mixed, "accum": scenario_accum, "bf16": scenario_bf16}


def main() -> int:
    data, out, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if what.startswith("fault:"):  # launched torchrun-style
        return run_fault(data, out, what.split(":", 1)[1], int(os.environ["RANK"]))
    from mlmm.training import distributed

    rank, world = distributed.init_distributed()
    for name in what.split(","):
        result = SCENARIOS[name](data, out, rank)
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(result))
    distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
