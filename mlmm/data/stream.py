"""A resumable raw-sample stream: exact mid-epoch resume without re-reading the epoch.

One *slot* (``rank * num_workers + role``) reads its share of every epoch (see
:mod:`mlmm.data.train_stream` for the split). Its samples get a slot-global *raw index* ``r``
(epoch after epoch). Everything random is a function of counts, never of content:

* the shuffle buffer draws ``rng.randrange(len(buffer))`` once per incoming sample, with ``rng``
  seeded per slot — so the buffer's content after ``n`` emissions can be *simulated on integers*;
* per-sample randomness (caption choice, crops) is seeded by ``(seed, epoch, key)``.

The position of a slot is ``(emitted, used)``: raw samples emitted by the buffer, and how many
processed items of the last one were already batched (``all_languages`` makes several). To
resume, the buffer is simulated up to ``emitted``, the raw samples it holds are fetched, and the
stream continues. Whole shards before them are skipped without being opened, using the sample
counts of :meth:`mlmm.data.shardio.ShardReader.counts`; without counts the slot's stream is read
from its start and dropped up to there, with a warning that says so.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Iterator, Optional, Sequence

from mlmm.data.shardio import ShardReader, shard_name

log = logging.getLogger("mlmm.data")


def shard_counts(shards: Sequence[str], reader: Optional[ShardReader] = None) -> list[Optional[int]]:
    """Samples per shard (None when unknown): from ``data.shard_sizes``, else the ``index.json`` or ``sizes.json``
    beside each shard (see :mod:`mlmm.data.shardio`)."""
    return (reader or ShardReader()).counts(shards)


class SlotPlan:
    """Which raw samples slot ``slot`` of ``n_slots`` reads, epoch after epoch, addressable by raw index."""

    def __init__(self, shards: Sequence[str], *, seed: int, slot: int, n_slots: int,
                 reader: Optional[ShardReader] = None):
        self.shards, self.seed, self.slot, self.n_slots = list(shards), seed, slot, n_slots
        self.reader = reader or ShardReader()
        self.counts = dict(zip(self.shards, self.reader.counts(self.shards)))
        self.known = all(c is not None for c in self.counts.values())
        self._per_epoch: dict[int, int] = {}

    def epoch_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def by_shard(self, epoch: int) -> bool:
        return len(self.shards) >= self.n_slots

    def epoch_size(self, epoch: int) -> Optional[int]:
        """Raw samples this slot reads in `epoch` (None when shard sizes are unknown)."""
        if not self.known:
            return None
        if epoch not in self._per_epoch:
            order = self.epoch_order(epoch)
            if self.by_shard(epoch):
                n = sum(self.counts[s] for s in order[self.slot::self.n_slots])
            else:
                n = len(range(self.slot, sum(self.counts[s] for s in order), self.n_slots))
            self._per_epoch[epoch] = n
        return self._per_epoch[epoch]

    def locate(self, raw_index: int) -> tuple[int, int]:
        """Slot-global raw index -> (epoch, index within the slot's epoch)."""
        epoch = 0
        while True:
            n = self.epoch_size(epoch)
            if n is None:
                raise ValueError("shard sizes unknown (no index.json, sizes.json or data.shard_sizes): cannot seek")
            if n == 0:
                raise RuntimeError(f"slot {self.slot}/{self.n_slots} has no sample in epoch {epoch}")
            if raw_index < n:
                return epoch, raw_index
            raw_index -= n
            epoch += 1

    def epoch_samples(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        """The slot's raw samples of `epoch` from its `skip`-th on, tagged with ``__epoch__``."""
        order = self.epoch_order(epoch)
        if self.by_shard(epoch):
            mine, stride, offset = order[self.slot::self.n_slots], 1, 0
        else:
            mine, stride, offset = order, self.n_slots, self.slot
        first = offset + skip * stride  # position (in `mine`'s concatenation) of the first wanted sample
        pos = 0
        for shard in mine:
            n = self.counts.get(shard)
            if n is not None and pos + n <= first:  # the whole shard is before the resume point
                pos += n
                continue
            seen = 0
            for raw in self.reader.read(shard, expected=n):
                if "__error__" in raw:  # pad the lost samples so that raw indices stay aligned
                    lost = (n - seen) if n is not None else 1
                    for j in range(lost):
                        if pos >= first and (pos - offset) % stride == 0:
                            yield {**raw, "__key__": f"{shard_name(shard)}#{seen + j}", "__epoch__": epoch}
                        pos += 1
                    break
                if pos >= first and (pos - offset) % stride == 0:
                    raw["__epoch__"] = epoch
                    yield raw
                pos += 1
                seen += 1

    def read(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(raw index, raw sample) from slot-global raw index `start` on, forever."""
        if start and self.known:  # jump straight to the epoch and offset of `start`
            (epoch, skip), r = self.locate(start), start
        else:  # unknown shard sizes: read from the beginning and drop what comes before `start`
            if start:
                log.warning("resume: slot %d/%d has no sample counts for its shards (no index.json / sizes.json beside "
                            "them, no data.shard_sizes): reading and dropping %d raw samples to reach its position",
                            self.slot, self.n_slots, start)
            epoch, skip, r = 0, 0, 0
        while True:
            n = 0
            for raw in self.epoch_samples(epoch, skip):
                if r >= start:
                    yield r, raw
                r += 1
                n += 1
            if n == 0 and skip == 0:
                raise RuntimeError(f"slot {self.slot}/{self.n_slots} got no usable sample in epoch {epoch}: its "
                                   f"share of the {len(self.shards)} shards is empty (use fewer ranks/workers)")
            epoch, skip = epoch + 1, 0


class ShuffleBuffer:
    """Seeded shuffle buffer: one ``randrange`` per sample once full, whatever the content."""

    def __init__(self, size: int, seed: str):
        self.size = max(int(size), 1)
        self.rng = random.Random(seed)
        self.items: list[Any] = []

    def push(self, item: Any) -> Optional[Any]:
        """Add `item`; return the emitted one (None while filling)."""
        if self.size <= 1:
            return item
        self.items.append(item)
        if len(self.items) < self.size:
            return None
        j = self.rng.randrange(len(self.items))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()


def restore(plan: SlotPlan, buffer: ShuffleBuffer, emitted: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Fast-forward `buffer` to the state after `emitted` emissions; return the raw iterator to continue with.

    The buffer is simulated on raw indices, then filled with the raw samples it holds (read from
    the oldest one on, skipping whole shards before it).
    """
    r = 0
    done = 0
    while done < emitted:
        if buffer.push(r) is not None:
            done += 1
        r += 1
    held = list(buffer.items)  # raw indices, in buffer order
    start = min(held + [r])
    reader = plan.read(start)
    wanted = {idx: pos for pos, idx in enumerate(held)}
    while start < r:  # read up to r - 1 so that `reader` continues at r
        idx, raw = next(reader)
        if idx in wanted:
            buffer.items[wanted.pop(idx)] = raw
        start = idx + 1
    if wanted:
        raise RuntimeError(f"resume: could not re-read raw samples {sorted(wanted)[:5]} of slot {plan.slot}")
    return reader
