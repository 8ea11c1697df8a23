"""Running the updates of a :class:`~mlmm.training.Trainer`: micro-batches, the step, the collective abort, logging.

``train.max_steps`` counts optimizer updates (DeepSpeed's ``global_steps``), each over ``train.grad_accum``
micro-batches of ``data.batch_size`` rows per rank: one update sees ``batch_size * grad_accum * world size``
samples. The LR schedule, logging (``log_every``), checkpoints (``save_every``) and resume count updates too.
Nothing in an update reads a tensor back from the device; the losses are read every ``log_every`` updates.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from mlmm.data.batch import Batch
from mlmm.training import checkpoint
from mlmm.training.failures import describe, raise_if_any_rank_failed
from mlmm.training.guards import out_of_memory_error
from mlmm.training.prefetch import DevicePrefetcher

log = logging.getLogger("mlmm")


class TrainLoop:
    """The update loop of the Trainer (which sets ``cfg``, ``engine``, ``loss``, ``loader``, ``loader_state``,
    ``coverage``, ``preprocessor``, ``device``, ``dtype``, ``rank``, ``world``, ``is_main`` and ``writer``)."""

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
                # decode_on_device / normalize_on_device / logmel_on_device: JPEG rows decoded, uint8 images
                # normalised, waveforms turned into log-mel features, on the device (no-ops otherwise)
                batch = batch.decode_images().normalize_images(self.dtype).audio_features(self.cfg.model.audio,
                                                                                          self.dtype)
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
