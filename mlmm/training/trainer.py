"""The training recipe: ``setup() / train() / save_checkpoint() / export() / cleanup()``.

    trainer = Trainer(load_config("recipes/configs/tiny_clip.yaml"))
    trainer.setup(); trainer.train(); trainer.export(); trainer.cleanup()

Everything method-specific lives in the model and the registered loss the config names.
"""
from __future__ import annotations

import json
import logging
import time
import weakref
from pathlib import Path
from typing import Optional

import torch

from mlmm.config import RunConfig
from mlmm.data.batch import Batch
from mlmm.data.pipeline import resolve_shards
from mlmm.data.shardio import ShardReader
from mlmm.data.train_stream import LoaderState
from mlmm.distill.prepare import prepare_train_data
from mlmm.registry import LOSSES
from mlmm.sources import is_hub_id
from mlmm.training import checkpoint, distributed, finetune, resume, rng, run_identity, runlock, schedule
from mlmm.training.engine import (TrainModule, build_ds_config, compile_towers, compute_dtype, full_state_dict,
                                  initialize, restore_torch_linear)
from mlmm.training.errors import ResumeMismatch
from mlmm.training.failures import describe, raise_if_any_rank_failed
from mlmm.training.guards import LanguageCoverage, out_of_memory_error
from mlmm.training.logs import setup_logging
from mlmm.training.prefetch import DevicePrefetcher

log = logging.getLogger("mlmm")


def load_tokenizer(cfg: RunConfig):
    if cfg.model.text is None:
        return None
    from transformers import AutoTokenizer

    from mlmm.hub.pretrained import load_hf

    key = "model.text.tokenizer" if cfg.model.text.tokenizer else "model.text.pretrained"
    src = cfg.model.text.tokenizer or cfg.model.text.pretrained
    try:  # a local folder or a Hub id (org/name[@revision]) through the HF cache
        tokenizer = load_hf(AutoTokenizer.from_pretrained, src, key)
    except FileNotFoundError as e:
        if is_hub_id(src):
            raise
        raise FileNotFoundError(f"{e} (train a tokenizer with "
                                "`python -m mlmm.data.tokenization --manifest M.jsonl --out DIR`)") from None
    if cfg.model.text.extend_vocab is not None:  # new-language words appended (mlmm.data.vocab)
        from mlmm.data.vocab import extend_tokenizer

        tokenizer = extend_tokenizer(tokenizer, cfg.model.text.extend_vocab)
    return tokenizer


class Trainer:
    """``train.max_steps`` counts optimizer updates (DeepSpeed's ``global_steps``), each over ``train.grad_accum``
    micro-batches of ``data.batch_size`` rows per rank: one update sees ``batch_size * grad_accum * world size``
    samples. The LR schedule, logging (``log_every``), checkpoints (``save_every``) and resume count updates too."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.step = 0  # optimizer updates done (applied or skipped)
        self.samples_seen = 0
        self.history: list[dict] = []  # one record per logged step
        self.losses: list[float] = []  # the global-batch loss of every update run by this process
        self.bad_steps = 0  # consecutive skipped (non-finite) updates
        self.skipped_steps = 0
        self.failure: Optional[BaseException] = None  # this rank's error, stopping every rank at the next update
        self._null: Optional[Batch] = None

    # ---------------------------------------------------------------------------- setup
    def setup(self) -> "Trainer":
        cfg = self.cfg
        self.rank, self.world = distributed.init_distributed()
        self.device = distributed.device()
        self.is_main = self.rank == 0
        notes = [self._claim_output_dir()]  # before anything is written there
        try:
            rng.seed_all(cfg.seed)  # the same initial weights on every rank
            self.tokenizer = load_tokenizer(cfg)
            self.run_record = run_identity.run_record(cfg, self.tokenizer, build_ds_config(cfg, self.device))
            self.plan = distributed.main_decides(
                lambda: resume.plan(cfg, self.out / "checkpoints", self.run_record, self.world))
            setup_logging(self.out, self.is_main)
            for note in [*notes, *self.plan.notes]:
                if note and self.is_main:
                    log.warning("%s", note)
            return self._build()
        except BaseException:
            self._release_output_dir()
            raise

    def _claim_output_dir(self) -> Optional[str]:
        """Rank 0 takes ``output_dir/run.lock``; every rank raises OutputDirInUse if it cannot. -> a note to log."""
        def take() -> Optional[str]:
            self.lock, note = runlock.acquire(self.out)
            weakref.finalize(self, self.lock.release)  # a Trainer dropped without cleanup() frees the folder
            return note

        return distributed.main_decides(take)

    def _release_output_dir(self) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _build(self) -> "Trainer":
        from mlmm.data.pipeline import Preprocessor, build_train_loader
        from mlmm.models.model import MultimodalModel

        cfg = self.cfg
        self.coverage = (LanguageCoverage(self.tokenizer, cfg.model.text.tokenizer or cfg.model.text.pretrained)
                         if self.tokenizer is not None and cfg.model.text is not None else None)
        self.model = MultimodalModel(cfg.model, self.tokenizer)
        loss_entry = LOSSES.get(cfg.loss.name, key="loss.name")
        self.loss = loss_entry.cls(cfg.loss, self.model.modalities)
        prepare_train_data(cfg.data, self.loss, self.is_main)  # data.parallel_jsonl: shards made on first use
        self._check_built_identity()
        module = TrainModule(self.model, self.loss)
        if cfg.train.init_from:  # fine-tuning hooks (generic; see mlmm.training.finetune)
            finetune.load_init(self.model, cfg.train.init_from, cfg.train.trainable)
        if cfg.train.trainable is not None:
            n_train, n_total = finetune.freeze_except(module, cfg.train.trainable)
            log.info("train.trainable: %.3fM of %.2fM parameters trainable", n_train / 1e6, n_total / 1e6)
        if cfg.train.gradient_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            compile_towers(self.model)
        self.engine, self.ds_config = initialize(cfg, module, self.device)
        self.dtype = compute_dtype(self.ds_config)
        rng.seed_rank(cfg.seed, self.rank)  # dropout, masks, caption edits: each rank its own (a resume restores)
        if self.is_main:
            n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())  # ZeRO-3: partitioned
            log.info("model: towers %s, %.2fM parameters; ZeRO stage %d, %s, world size %d, device %s",
                     self.model.modalities, n_params / 1e6, self.engine.zero_optimization_stage(),
                     str(self.dtype).replace("torch.", ""), self.world, self.device)
        self._resume()
        if self.is_main:  # once the checkpoint loaded: a refused resume leaves the run's config.json as it was
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False))
        self.n_shards = len(resolve_shards(cfg.data.train_shards))  # once: not on every rank at every save
        self.preprocessor = preprocessor = Preprocessor(cfg.model, self.tokenizer, train=True,
                                                        extra_shapes=finetune.loss_extra_inputs(self.loss),
                                                        uint8_images=cfg.data.normalize_on_device,
                                                        encoded_images=cfg.data.decode_on_device)
        data_cfg, data_state = cfg.data, self._data_resume_state()
        if self.step and data_state is None:  # layout changed: a new, deterministic order from here
            data_cfg = type(data_cfg)(**{**data_cfg.__dict__, "seed": data_cfg.seed + self.step})
        self.loader_state = LoaderState(cfg.data.num_workers, data_state)
        self.loader = build_train_loader(data_cfg, preprocessor, rank=self.rank, world_size=self.world,
                                         state=data_state, pin_memory=self.device.type == "cuda")
        self.writer = self._tensorboard()
        return self

    def _check_built_identity(self) -> None:
        """The teachers' weights and prepared shards exist only now: a resumed run refuses if they changed."""
        saved = self.plan.state.get("run") if self.plan.tag is not None else None
        changed = run_identity.check_built(saved if isinstance(saved, dict) else None, self.run_record, self.cfg,
                                           self.loss)
        if changed and self.cfg.train.resume != "force":
            raise ResumeMismatch(f"{self.out / 'checkpoints' / self.plan.tag} belongs to another run: "
                                 f"{'; '.join(changed)}. Revert them, use another output_dir, or set "
                                 "train.resume=force to resume anyway")
        if changed and self.is_main:
            log.warning("train.resume=force: resuming although %s", "; ".join(changed))

    def _tensorboard(self):
        if not (self.cfg.train.tensorboard and self.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: logs still go to train.log
            log.warning("tensorboard is not installed; scalars go to train.log only")
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _resume(self) -> None:
        """Load the checkpoint :func:`mlmm.training.resume.plan` chose; the config's lr schedule and optimizer
        hyperparameters then apply (legitimate edits, logged)."""
        self.resumed_state = state = None
        if self.plan.tag is not None:
            state = checkpoint.load(self.engine, self.out / "checkpoints", self.plan.tag, world_size=self.world,
                                    is_main=self.is_main)
            schedule.follow_config(self.engine.lr_scheduler, self.cfg.train)
            self.resumed_state = state
            if self.is_main and self.plan.edits:
                log.info("config edits applied on resume: %s", "; ".join(self.plan.edits))
        if state is not None:
            self.step = state["step"]
            self.samples_seen = state.get("samples_seen", 0)
            self.skipped_steps = state.get("skipped_steps", 0)
            log.info("resumed from %s at step %d%s", self.out / "checkpoints" / checkpoint.tag_for(self.step),
                     self.step, f" (written by {state['resharded_from']} processes, now {self.world}: loaded "
                                "through a DeepSpeed universal checkpoint)" if "resharded_from" in state else "")

    def _data_resume_state(self) -> Optional[dict]:
        """This rank's data position from the checkpoint.

        Same layout (ranks x workers): the exact position of every slot. Another layout: the rest
        of the interrupted pass is re-split over the new slots (:mod:`mlmm.data.resplit`).
        """
        data = (getattr(self, "resumed_state", None) or {}).get("data")
        if not data:
            return None
        workers = max(self.cfg.data.num_workers, 1)
        if data.get("world_size") == self.world and data.get("num_workers") == workers:
            return data["ranks"][self.rank]
        shards = resolve_shards(self.cfg.data.train_shards)
        counts = ShardReader.from_config(self.cfg.data).counts(shards)
        if data.get("n_shards", len(shards)) != len(shards) or any(n is None for n in counts):
            log.warning("data layout and shards changed (or shard sizes unknown): the data order restarts "
                        "deterministically from a new seed instead of the exact position")
            return None
        log.info("data layout changed (world size %s -> %d, workers %s -> %d): the rest of the interrupted pass is "
                 "re-split over the new ranks/workers", data.get("world_size"), self.world, data.get("num_workers"),
                 workers)
        record = {"from": data, "seed": data.get("seed", self.cfg.data.seed),
                  "buffer_size": data.get("shuffle_buffer", self.cfg.data.shuffle_buffer)}
        return {"slots": {}, "next_role": 0, "resplit": record}

    # ---------------------------------------------------------------------------- train
    def prepare(self, batch: Batch) -> Batch:
        """A loader batch -> on the device: the language check (on the host copy), then the copy."""
        if self.coverage is not None:
            self.coverage.check(batch)
        return batch.to(self.device, self.dtype)

    def null_batch(self) -> Batch:
        """``data.batch_size`` rows without any modality: what a failed rank steps on (its loss is then NaN)."""
        if self._null is None:
            rows = [{"key": f"__null_{i}", "meta": {}, "lang": ""} for i in range(self.cfg.data.batch_size)]
            self._null = self.preprocessor.collate(rows).to(self.device, self.dtype)
        return self._null

    def train_step(self, batch: Optional[Batch], *, failure: Optional[BaseException] = None,
                   prepared: bool = False) -> dict[str, torch.Tensor]:
        """One micro-batch: forward, backward and DeepSpeed's step, which updates the weights at the end of each
        ``train.grad_accum`` micro-batches. Returns the detached loss terms, left on the device (no host sync).

        ``failure``: an error of this rank while fetching or checking `batch`. A non-finite loss or gradient skips
        the update on every rank (DeepSpeed's check; counted, see ``train.nan_patience``); a rank that failed
        makes it skip on purpose, and on that skipped update every rank raises (:mod:`mlmm.training.failures`).
        """
        boundary = self.engine.is_gradient_accumulation_boundary()
        if failure is None and self.failure is None:
            try:
                batch = batch if prepared else self.prepare(batch)
                # decode_on_device / normalize_on_device: JPEG rows decoded, uint8 images normalised (no-ops otherwise)
                batch = batch.decode_images().normalize_images(self.dtype)
            except Exception as e:
                failure = e
        if failure is not None and self.failure is None:
            if self.world == 1:
                raise failure  # nobody to tell
            self.failure = failure
            log.error("rank %d, step %d: %s -- stopping every rank at the end of this step", self.rank,
                      self.step + 1, describe(failure))
        if self.failure is not None:
            batch = self.null_batch()
        try:
            out = self.engine(batch)
            loss = out["loss"] * float("nan") if self.failure is not None else out["loss"]
            self.engine.backward(loss)
            self.engine.step()
        except torch.OutOfMemoryError as e:
            raise out_of_memory_error(e, step=self.step + 1, batch_size=len(batch), world=self.world) from e
        terms = {k: v.detach() for k, v in out.items()}
        if boundary:
            self._after_update(self.engine.was_step_applied(), terms)
        return terms

    def _after_update(self, applied: bool, terms: dict[str, torch.Tensor]) -> None:
        if applied:
            self.bad_steps = 0
            return
        # the update was skipped on every rank (DeepSpeed decides it globally): find out why, together
        raise_if_any_rank_failed(self.failure, self.step + 1)
        self.bad_steps += 1
        self.skipped_steps += 1
        values = {k: float(v.float().mean()) for k, v in terms.items()}  # a host read, on this rare path only
        what = "loss" if values["loss"] != values["loss"] or abs(values["loss"]) == float("inf") else "grad norm"
        log.warning("step %d: non-finite %s, update skipped (%d in a row) %s", self.step + 1, what, self.bad_steps,
                    values)
        if self.bad_steps >= self.cfg.train.nan_patience:
            raise FloatingPointError(
                f"step {self.step + 1}: {self.bad_steps} consecutive steps with a non-finite loss or grad norm "
                f"(train.nan_patience={self.cfg.train.nan_patience}); last loss terms: {values}")

    def _check_bad_data(self) -> dict[str, int]:
        """Bad-sample counts of this rank; abort past data.max_bad_fraction."""
        counts: dict[str, int] = {}
        for st in self.loader_state.slots.values():
            for reason, n in st.get("skipped", {}).items():
                counts[reason] = counts.get(reason, 0) + n
        bad, seen = self.loader_state.bad_counts()
        if seen >= 20 and bad / seen > self.cfg.data.max_bad_fraction:
            raise RuntimeError(f"data: {bad} of {seen} samples ({bad / seen:.1%}) were unusable, more than "
                               f"data.max_bad_fraction={self.cfg.data.max_bad_fraction}: {counts}")
        return counts

    def optimizer_step(self, batches: DevicePrefetcher) -> dict[str, torch.Tensor]:
        """``train.grad_accum`` micro-batches and one optimizer update; -> the loss terms averaged over the
        micro-batches (device tensors)."""
        total: dict[str, torch.Tensor] = {}
        for _ in range(self.cfg.train.grad_accum):
            host, batch, error = next(batches)
            if error is None and self.failure is None:
                try:  # this rank's own data checks: a failure is decided together at the end of the update
                    self.loader_state.update(host)
                    self.samples_seen += len(host) * self.world
                    self._check_bad_data()
                except Exception as e:
                    error = e
            terms = self.train_step(batch, failure=error, prepared=True)
            total = {k: total[k] + v if k in total else v.clone() for k, v in terms.items()}
        self.step += 1
        return {k: v / self.cfg.train.grad_accum for k, v in total.items()}

    def train(self) -> list[dict]:
        cfg = self.cfg.train
        self._bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.cfg.name, dynamic_ncols=True)
        batches = self.batches()
        while self.step < cfg.max_steps:
            self.run_step(batches)
        self._flush_losses(self._pending)
        self._pending = []
        if self._bar is not None:
            self._bar.close()
        self.save_checkpoint()
        return self.history

    def batches(self) -> DevicePrefetcher:
        """The loader's batches on the device, the next one copied while the current step runs."""
        self._t0, self._n0, self._pending = time.perf_counter(), self.samples_seen, []
        return DevicePrefetcher(self.loader, self.prepare, self.device)

    def run_step(self, batches: DevicePrefetcher) -> None:
        """One update as :meth:`train` runs it: micro-batches from the loader, the step, and every
        ``log_every`` updates the logging (the only host reads), every ``save_every`` a checkpoint."""
        cfg = self.cfg.train
        terms = self.optimizer_step(batches)
        self._pending.append(terms["loss"])  # losses stay on the device until the next log step
        checkpoint._fault(f"after_step:{self.step}")  # test hook (MLMM_INJECT_FAULT), no-op otherwise
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.update(1)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self._flush_losses(self._pending)
            self._pending = []
            bad = self._check_bad_data()
            if bad and self.is_main:
                log.info("bad samples so far (rank 0): %s", bad)
            rate = (self.samples_seen - self._n0) / max(time.perf_counter() - self._t0, 1e-9)
            self._log(terms, rate)
            if bar is not None:
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
            self._t0, self._n0 = time.perf_counter(), self.samples_seen
        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
            self.save_checkpoint()

    def _global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks: each rank's loss is its share of the global-batch loss (see ``local_vs_global``)."""
        values = values.float()
        if self.world > 1:
            torch.distributed.all_reduce(values)
            values = values / self.world
        return values

    def _flush_losses(self, pending: list[torch.Tensor]) -> None:
        if pending:
            self.losses.extend(self._global_mean(torch.stack([v.reshape(()) for v in pending])).tolist())

    def _log(self, terms: dict[str, torch.Tensor], rate: float) -> None:
        lr = self.engine.get_lr()[0]
        temps = self.loss.temperatures() if hasattr(self.loss, "temperatures") else {}
        means = self._global_mean(torch.stack([v.float().mean() for v in terms.values()])).tolist()
        terms = dict(zip(terms, means))
        record = {"step": self.step, **terms, "lr": lr, "samples_per_s": rate, **temps}
        self.history.append(record)
        if not self.is_main:
            return
        text = " ".join(f"{k}={v:.4g}" for k, v in terms.items())
        log.info("step %d %s lr=%.3g samples/s=%.1f", self.step, text, lr, rate)
        if self.writer is not None:
            for k, v in record.items():
                if k != "step":
                    self.writer.add_scalar(f"train/{k}", v, self.step)

    # ---------------------------------------------------------------------------- save / export
    def save_checkpoint(self) -> Path:
        ranks = [self.loader_state.to_dict()]
        if self.world > 1:
            ranks = [None] * self.world
            torch.distributed.all_gather_object(ranks, self.loader_state.to_dict(), group=distributed.host_group())
        state = {"run": self.run_record, "samples_seen": self.samples_seen, "world_size": self.world,
                 "skipped_steps": self.skipped_steps, "seed": self.cfg.seed,
                 "bad_samples": self._check_bad_data(), "loss_history": self.history[-5:],
                 "data": {"world_size": self.world, "num_workers": max(self.cfg.data.num_workers, 1), "ranks": ranks,
                          "seed": self.cfg.data.seed, "shuffle_buffer": self.cfg.data.shuffle_buffer,
                          "n_shards": self.n_shards}}
        path = checkpoint.save(self.engine, self.out / "checkpoints", self.step, state,
                               keep=self.cfg.train.keep_checkpoints, is_main=self.is_main)
        distributed.barrier()
        return path

    def export(self, out_dir: Optional[str | Path] = None) -> Path:
        """Write ``<output_dir>/export`` (config.json + model.safetensors + tokenizer); collective call."""
        from mlmm.hub import save_pretrained

        out_dir = Path(out_dir or self.out / "export")
        sd = full_state_dict(self.engine, self.model)  # every rank takes part in the ZeRO-3 gather
        if self.is_main:
            save_pretrained(self.model, out_dir, state_dict=sd, run_config=self.cfg,
                            teachers=finetune.loss_teachers(self.loss))
            log.info("exported %s", out_dir)
        distributed.barrier()
        return out_dir

    def cleanup(self, destroy_process_group: bool = False, failed: bool = False) -> None:
        """Close writers; optionally tear down torch.distributed (entry points do, at exit).

        The process group is kept by default so that one process can run several trainers
        (tests, notebooks): DeepSpeed caches groups that a destroyed group would leave dangling.
        ``failed``: the run is ending on an error; no barrier then (the other ranks may be inside a collective
        this one will never join), the process group is left to end with the process.
        """
        if getattr(self, "writer", None) is not None:
            self.writer.close()
        self._release_output_dir()
        restore_torch_linear()  # a ZeRO-3 engine swapped it for the whole process
        if failed:
            return
        if destroy_process_group:
            distributed.cleanup()
        else:
            distributed.barrier()
