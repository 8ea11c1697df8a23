"""The training recipe: ``setup() / train() / save_checkpoint() / export() / cleanup()``.

    trainer = Trainer(load_config("recipes/configs/tiny_clip.yaml"))
    trainer.setup(); trainer.train(); trainer.export(); trainer.cleanup()

Everything method-specific lives in the model and the registered loss the config names.
"""
from __future__ import annotations

import json
import logging
import weakref
from pathlib import Path
from typing import Optional

import torch

from mlmm.config import ConfigError, RunConfig
from mlmm.data.batch import Batch
from mlmm.data.shards import resolve_shards
from mlmm.data.shardio import ShardReader
from mlmm.data.train_stream import LoaderState
from mlmm.distill.prepare import prepare_train_data
from mlmm.registry import LOSSES
from mlmm.sources import is_hub_id
from mlmm.training import checkpoint, distributed, finetune, resume, rng, run_identity, runlock, schedule
from mlmm.training.engine import (TrainModule, build_ds_config, compile_towers, compute_dtype, full_state_dict,
                                  initialize, restore_torch_linear)
from mlmm.training.errors import ResumeMismatch
from mlmm.training.guards import LanguageCoverage
from mlmm.training.logs import setup_logging
from mlmm.training.loop import TrainLoop

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


class Trainer(TrainLoop):
    """Setup, resume, checkpoints and export; the updates themselves: :class:`mlmm.training.loop.TrainLoop`."""

    def __init__(self, cfg: RunConfig):
        if not cfg.data.train_shards:  # refused before anything is built or written
            raise ConfigError(f"{cfg.config_path or 'config'}: data.train_shards: required (a shard folder, a glob or "
                              "a comma list)")
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
        from mlmm.data.preprocess import Preprocessor
        from mlmm.data.train_stream import build_train_loader
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
                                                        encoded_images=cfg.data.decode_on_device,
                                                        audio_waves=cfg.data.logmel_on_device)
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
