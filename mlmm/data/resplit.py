"""Resume on a different data layout (world size x workers): the rest of the pass is re-split exactly.

A checkpoint stores, per stream slot, how many raw samples its shuffle buffer emitted. Because the
buffer is a function of counts only (:mod:`mlmm.data.stream`), the *set* of raw samples each old
slot consumed can be recomputed on integers. When the job comes back with another number of
ranks or workers:

1. for every old slot, the samples of its current pass that it has not consumed yet (still in its
   shuffle buffer or not read) are listed as ``(shard, index in shard, epoch)``;
2. the lists of all old slots, concatenated in slot order, are dealt round-robin to the new slots
   (new slot ``j`` of ``n`` takes items ``j, j + n, ...``);
3. each new slot reads its share first, then continues with ordinary epochs of the new layout
   from ``epoch0`` = (latest old epoch + 1).

So within the interrupted pass no sample is seen twice or skipped, and the new order is a pure
function of the checkpoint. The record ``{"from": <old data state>, "seed", "buffer_size"}`` (the
old run's data seed and shuffle-buffer size) is kept in the data state, so the re-split survives
later resumes, and further layout changes nest.
"""
from __future__ import annotations

import bisect
from itertools import groupby
from typing import Any, Iterator, Optional, Sequence

from mlmm.data.shardio import ShardReader, shard_name
from mlmm.data.stream import ShuffleBuffer, SlotPlan

Item = tuple[str, int, int]  # (shard path, sample index within the shard, epoch tag)


def _item_in_epoch(plan: SlotPlan, epoch: int, k: int) -> Item:
    """The `k`-th raw sample of `plan`'s slot in `epoch` as (shard, index in shard, epoch)."""
    order = plan.epoch_order(epoch)
    if plan.by_shard(epoch):
        mine, pos = order[plan.slot::plan.n_slots], k
    else:
        mine, pos = order, plan.slot + k * plan.n_slots
    for shard in mine:
        n = plan.counts[shard]
        if pos < n:
            return shard, pos, epoch
        pos -= n
    raise IndexError(f"sample {k} is past the end of epoch {epoch} of slot {plan.slot}")


def consumed(buffer_size: int, seed: int, slot: int, emitted: int) -> set[int]:
    """Raw indices (slot-local) that slot `slot`'s shuffle buffer emitted in its first `emitted` emissions."""
    buffer = ShuffleBuffer(buffer_size, f"shuffle/{seed}/{slot}")
    out: set[int] = set()
    r = 0
    while len(out) < emitted:
        x = buffer.push(r)
        if x is not None:
            out.add(x)
        r += 1
    return out


class SlotSource:
    """The raw samples of one slot: an optional re-split prefix, then the layout's epochs from `epoch0`."""

    def __init__(self, shards: Sequence[str], *, seed: int, slot: int, n_slots: int,
                 prefix: Sequence[Item] = (), epoch0: int = 0, reader: Optional[ShardReader] = None):
        self.plan = SlotPlan(shards, seed=seed, slot=slot, n_slots=n_slots, reader=reader)
        self.slot, self.n_slots = slot, n_slots
        self.prefix, self.epoch0 = list(prefix), epoch0
        self.base = sum(self.plan.epoch_size(e) or 0 for e in range(epoch0))  # plan raw index of epoch0's start

    @property
    def known(self) -> bool:
        return self.plan.known

    def epoch_size(self, epoch: int) -> Optional[int]:
        return self.plan.epoch_size(epoch)

    def segments(self, upto: int) -> list[int]:
        """Start raw indices of the passes (prefix, then each epoch) covering raw indices < `upto` and one more."""
        starts, r, epoch = [], 0, self.epoch0
        if self.prefix:
            starts.append(0)
            r = len(self.prefix)
        while True:
            starts.append(r)
            if r > upto:
                return starts
            size = self.plan.epoch_size(epoch)
            if not size:
                raise RuntimeError(f"slot {self.slot}/{self.n_slots} has no sample in epoch {epoch}")
            r += size
            epoch += 1

    def item_at(self, r: int) -> Item:
        if r < len(self.prefix):
            return tuple(self.prefix[r])
        epoch, k = self.plan.locate(r - len(self.prefix) + self.base)
        return _item_in_epoch(self.plan, epoch, k)

    def read(self, start: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """(raw index, raw sample) from `start` on, forever (the prefix first)."""
        r = start
        if start < len(self.prefix):
            for raw in _read_items(self.prefix[start:], self.plan.reader):
                yield r, raw
                r += 1
        for q, raw in self.plan.read(r - len(self.prefix) + self.base):
            yield q - self.base + len(self.prefix), raw


def _read_items(items: Sequence[Item], reader: ShardReader) -> Iterator[dict[str, Any]]:
    """The raw samples named by `items`, in order (consecutive items of one shard share one read)."""
    for shard, run in groupby(items, key=lambda it: it[0]):
        run = list(run)
        wanted = {idx for _, idx, _ in run}
        found: dict[int, dict[str, Any]] = {}
        error = None
        for i, raw in enumerate(reader.read(shard)):
            if "__error__" in raw:
                error = raw
                break
            if i in wanted:
                found[i] = raw
            if len(found) == len(wanted):
                break
        for _, idx, epoch in run:
            raw = found.get(idx) or {**(error or {"__error__": f"missing sample: {shard}#{idx}"}),
                                     "__url__": shard, "__key__": f"{shard_name(shard)}#{idx}"}
            yield {**raw, "__epoch__": epoch}


def remainder(shards: Sequence[str], old: dict, *, seed: int, buffer_size: int,
              reader: Optional[ShardReader] = None) -> tuple[list[Item], int]:
    """(unconsumed items of every old slot's current pass, in slot order; epoch0 for the new layout)."""
    n_old = int(old["world_size"]) * int(old["num_workers"])
    items: list[Item] = []
    last_epoch = 0
    for slot in range(n_old):
        rank_state = old["ranks"][slot // int(old["num_workers"])] or {}
        source = build_source(shards, seed=seed, slot=slot, n_slots=n_old, resplit=rank_state.get("resplit"),
                              reader=reader)
        if not source.known:
            raise ValueError("shard sizes unknown (no index.json, sizes.json or data.shard_sizes): cannot re-split "
                             "the data position")
        pos = (rank_state.get("slots") or {}).get(str(slot), {})
        done = consumed(buffer_size, seed, slot, int(pos.get("emitted", 0)))
        first = next(r for r in range(len(done) + 1) if r not in done)  # first raw index not consumed
        starts = source.segments(first)
        i = bisect.bisect_right(starts, first) - 1
        lo, hi = starts[i], starts[i + 1]
        for r in range(lo, hi):
            if r not in done:
                items.append(source.item_at(r))
        last_epoch = max(last_epoch, source.item_at(lo)[2] if hi > lo else 0)
    return items, last_epoch + 1


def build_source(shards: Sequence[str], *, seed: int, slot: int, n_slots: int,
                 resplit: Optional[dict] = None, reader: Optional[ShardReader] = None) -> SlotSource:
    """The raw-sample source of `slot`, honouring a re-split record from a layout change."""
    if not resplit:
        return SlotSource(shards, seed=seed, slot=slot, n_slots=n_slots, reader=reader)
    items, epoch0 = remainder(shards, resplit["from"], seed=int(resplit["seed"]),
                              buffer_size=int(resplit["buffer_size"]), reader=reader)
    return SlotSource(shards, seed=seed, slot=slot, n_slots=n_slots, prefix=items[slot::n_slots], epoch0=epoch0,
                      reader=reader)
