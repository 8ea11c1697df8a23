"""The training stream: raw samples -> shuffle buffer -> decode -> batches, resumable mid-epoch.

Per rank, per DataLoader worker, one "slot" = ``rank * num_workers + worker_id`` out of
``n_slots = world_size * num_workers``, repeated forever over epochs ``e = 0, 1, ...``:

1. shard list shuffled with ``random.Random(seed + e)`` — identical on every slot;
2. split so that every sample is read by exactly one slot per epoch (:mod:`mlmm.data.shards`):
   * ``#shards >= n_slots``: slot ``s`` reads ``shards[s::n_slots]``;
   * fewer shards than slots: every slot reads every shard and keeps sample ``i`` (position in the
     epoch's shard order) when ``i % n_slots == s`` — more I/O, same partition;
   slots may get unequal numbers of samples, which is harmless for an infinite stream;
3. decode + transform + tokenize (:class:`~mlmm.data.preprocess.Preprocessor`), with the language policy; samples
   that fail to decode are skipped, counted per reason and logged once per reason (see
   :meth:`~mlmm.data.preprocess.Preprocessor.check` and :mod:`mlmm.data.transforms` for the reasons);
4. a seeded shuffle buffer and batching with :func:`~mlmm.data.collate.collate`; buffer and batches run across
   epoch boundaries, so there is never a partial batch.

All randomness comes from ``random.Random`` seeded from ``(DataConfig.seed, epoch, slot)``, so a run
is reproducible for a fixed ``world_size`` and ``num_workers``.

Each batch carries ``batch.data_state`` = the position of the slot that made it (see
:mod:`mlmm.data.stream`) plus its bad-sample counts (``skipped``: {reason: n}, what ``data.max_bad_fraction``
bounds) and ``notes`` ({"caption truncated": n}: samples used after a change). The trainer keeps the latest state
per slot and stores them in the checkpoint; ``build_train_loader(..., state=...)`` continues exactly there.

DataLoader workers are served round-robin. On resume, worker ``w`` plays the *role* (slot within
the rank) ``(w + next_role) % num_workers`` so that the first batch after resume comes from the
slot that would have produced it in the uninterrupted run.
"""
from __future__ import annotations

import collections
import logging
import random
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from mlmm.config import DataConfig
from mlmm.data.batch import Batch
from mlmm.data.preprocess import Preprocessor
from mlmm.data.transforms import SampleError
from mlmm.data.shards import _parse, resolve_shards
from mlmm.data.resplit import build_source
from mlmm.data.shardio import ShardReader, redact
from mlmm.data.stream import ShuffleBuffer, restore

log = logging.getLogger("mlmm.data")


class TrainStream(torch.utils.data.IterableDataset):
    """Infinite stream of Batches for one rank; ``state`` = {slot: position} to resume from."""

    def __init__(self, shards: Sequence[str], data_cfg: DataConfig, preprocessor: Preprocessor, *,
                 rank: int, world_size: int, state: Optional[dict] = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.shards, self.cfg, self.pre = list(shards), data_cfg, preprocessor
        self.rank, self.world_size = rank, world_size
        self.state = state or {}
        self.skipped: collections.Counter[str] = collections.Counter()  # num_workers=0 only
        self.notes: collections.Counter[str] = collections.Counter()  # num_workers=0 only

    def slot(self) -> tuple[int, int]:
        """(slot, n_slots) of the calling process from the rank, worker id and resume role offset."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + int(self.state.get("next_role", 0))) % workers
        return self.rank * workers + role, self.world_size * workers

    def _process(self, raw: dict[str, Any], counts: collections.Counter,
                 notes: collections.Counter) -> list[dict[str, Any]]:
        if "__error__" in raw:
            reason, _, detail = raw["__error__"].partition(": ")
            error = SampleError(reason, detail)
        else:
            key = raw.get("__key__", "?")
            rng = random.Random(f"{self.cfg.seed}/{raw.get('__epoch__', 0)}/{key}")
            try:
                return self.pre(_parse(raw), rng, language_policy=self.cfg.language_policy,
                                languages=self.cfg.languages, text_field=getattr(self.cfg, "text_field", "captions"),
                                tokenize=False, notes=notes)
            except SampleError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - one sample must not stop the run: counted, bounded, logged
                error = SampleError(f"error: {type(e).__name__}", f"{key}: {e}")
                if not counts[error.reason]:
                    log.exception("unexpected error on sample %s", key)
        if not counts[error.reason]:
            log.warning("skipping bad sample (%s) in %s: %s — further ones with this reason are only counted",
                        error.reason, redact(raw.get("__url__", "?")), redact(str(error)))
        counts[error.reason] += 1
        return []

    def __iter__(self) -> Iterator[Batch]:
        slot, n_slots = self.slot()
        own = (self.state.get("slots") or {}).get(str(slot), {})
        emitted, used = int(own.get("emitted", 0)), int(own.get("used", 0))
        counts = collections.Counter(own.get("skipped", {}))
        notes = collections.Counter(own.get("notes", {}))
        self.skipped, self.notes = counts, notes
        plan = build_source(self.shards, seed=self.cfg.seed, slot=slot, n_slots=n_slots,
                            resplit=self.state.get("resplit"), reader=ShardReader.from_config(self.cfg))
        buffer = ShuffleBuffer(self.cfg.shuffle_buffer, f"shuffle/{self.cfg.seed}/{slot}")
        resume_partial = used > 0
        reader = restore(plan, buffer, emitted - 1 if resume_partial else emitted)
        if resume_partial:
            emitted -= 1
        batch: list[dict[str, Any]] = []
        barren = 0  # consecutive emitted samples with nothing usable
        limit = max(plan.epoch_size(0) or 0, 1000)
        for _, raw in reader:
            out = buffer.push(raw)
            if out is None:
                continue
            emitted += 1
            items = self._process(out, counts, notes)
            barren = 0 if items else barren + 1
            if barren > limit:
                raise RuntimeError(f"slot {slot}/{n_slots} got no usable sample in {barren} consecutive samples "
                                   f"(a whole epoch): skipped {dict(counts)}")
            if resume_partial:  # the part of this sample that went into the last batch before the stop
                items, resume_partial = items[used:], False
                first = used
            else:
                first = 0
            for k, item in enumerate(items, start=first):
                batch.append(item)
                if len(batch) == self.cfg.batch_size:
                    n_items = first + len(items)
                    position = {"emitted": emitted, "used": 0 if k == n_items - 1 else k + 1}
                    b = self.pre.collate(batch)
                    b.data_state = {"slot": slot, "n_slots": n_slots, **position, "skipped": dict(counts),
                                    "notes": dict(notes)}
                    yield b
                    batch = []


def build_train_loader(data_cfg: DataConfig, preprocessor: Preprocessor, *, rank: int, world_size: int,
                       state: Optional[dict] = None, pin_memory: bool = False) -> Iterable[Batch]:
    """An infinite iterable of Batches of ``data_cfg.batch_size`` for ``rank`` of ``world_size``.

    A ``torch.utils.data.DataLoader`` over a :class:`TrainStream` (``loader.dataset``) with
    ``data_cfg.num_workers`` processes (0 = in this process); batching happens in the workers.
    ``state`` (from :func:`loader_state`) resumes exactly where a previous run stopped. ``pin_memory`` (the
    trainer sets it on CUDA): batches arrive in page-locked memory (:meth:`Batch.pin_memory`), so their copy to the
    GPU runs asynchronously.
    """
    data_cfg.validate("data")
    shards = resolve_shards(data_cfg.train_shards)
    # sample counts read once here: a bad data.shard_sizes fails in this process, and forked workers inherit the cache
    ShardReader.from_config(data_cfg).counts(shards)
    stream = TrainStream(shards, data_cfg, preprocessor, rank=rank, world_size=world_size, state=state)
    workers = data_cfg.num_workers
    slots = world_size * max(workers, 1)
    if len(shards) < slots and rank == 0:
        log.warning("%d shard(s) for %d rank(s) x %d loader slot(s) each = %d reader slots: with fewer shards than "
                    "slots every slot reads every shard and keeps 1/%d of its samples (%dx the reading and "
                    "decoding of tar headers); write at least %d shards (smaller shard_size in "
                    "mlmm.data.write_shards), or lower data.num_workers", len(shards), world_size, max(workers, 1),
                    slots, slots, slots, slots)
    # an own generator: creating the iterator must not draw from the global torch RNG (which the
    # checkpoint restores), or a resumed run's dropout masks would shift by one draw
    generator = torch.Generator().manual_seed(data_cfg.seed)
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers, generator=generator,
                                       prefetch_factor=2 if workers > 0 else None, pin_memory=pin_memory)


class LoaderState:
    """Tracks, in the training process, the position of every slot of this rank from consumed batches."""

    def __init__(self, num_workers: int, start: Optional[dict] = None):
        self.workers = max(num_workers, 1)
        start = start or {}
        self.slots: dict[str, dict] = dict(start.get("slots", {}))
        self.next_role = int(start.get("next_role", 0))
        self.resplit = start.get("resplit")  # layout-change record (mlmm.data.resplit), kept for later resumes

    def update(self, batch: Batch) -> None:
        st = batch.data_state
        if st is None:
            return
        self.slots[str(st["slot"])] = {k: st[k] for k in ("emitted", "used", "skipped", "notes") if k in st}
        self.next_role = (self.next_role + 1) % self.workers

    def to_dict(self) -> dict:
        out = {"slots": self.slots, "next_role": self.next_role, "num_workers": self.workers}
        if self.resplit:
            out["resplit"] = self.resplit
        return out

    def bad_counts(self) -> tuple[int, int]:
        """(bad samples, raw samples emitted) over this rank's slots."""
        bad = sum(sum(s.get("skipped", {}).values()) for s in self.slots.values())
        return bad, sum(int(s.get("emitted", 0)) for s in self.slots.values())
