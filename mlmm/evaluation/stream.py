"""Stream a test set once: media are decoded in DataLoader workers, the model embeds each batch, and only the
embeddings and the metadata the task needs are kept (memory O(embeddings), never O(media)).

    data = embed_test_set(model, "shards/test", ["image"], keep=captions_of(["en", "de"]), num_workers=2)
    data.emb["image"]      # [N_image, E], rows in the order of data.keys (shard order, then position in the shard)
    data.skipped           # {"undecodable image": 2, "truncated shard": 1, ...}: what was skipped, per reason

Under ``torchrun`` / ``deepspeed`` (an initialised process group) each rank reads its share of the shards (whole
shards when there are at least as many shards as reader slots, else every slot-th sample), encodes it and the parts
are gathered; items are put back in shard order, so every rank holds exactly what one process would compute.
A sample that cannot be used (undecodable media, a truncated shard, invalid JSON, no media the model reads) is
skipped, counted per reason and logged once per reason per reader. Shards may be local or remote (any spec of
:func:`mlmm.data.shards.resolve_shards`), read by :class:`mlmm.data.shardio.ShardReader` with its retries; a shard
that stays unreadable counts once (``truncated shard`` / ``unreadable shard``).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from mlmm.data.transforms import SampleError
from mlmm.data.shards import _parse, resolve_shards
from mlmm.data.shardio import ShardReader
from mlmm.evaluation.distributed import gather_objects, world
from mlmm.modalities import modality

log = logging.getLogger(__name__)
Keep = Callable[[dict], dict]


def captions_of(languages: Optional[Sequence[str]] = None) -> Keep:
    """``keep`` for text tasks: ``{"captions": {lang: [str, ...]}}`` restricted to ``languages`` (blank strings
    dropped); captions that are not ``{lang: str | [str, ...]}`` are a ``bad captions`` skip."""
    wanted = set(languages) if languages else None

    def keep(meta: dict) -> dict:
        caps = meta.get("captions") or {}
        if not isinstance(caps, dict):
            raise SampleError("bad captions", f"captions is a {type(caps).__name__}, not {{lang: [str, ...]}}")
        out = {}
        for lang, c in caps.items():
            c = [c] if isinstance(c, str) else c
            if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
                raise SampleError("bad captions", f"captions[{lang!r}] is not a string or a list of strings")
            if wanted is None or lang in wanted:
                out[str(lang)] = [x.strip() for x in c if x.strip()]
        return {"captions": out}
    return keep


def fields_of(*names: str) -> Keep:
    """``keep`` that copies the named json fields (e.g. the class label of a classification set)."""
    return lambda meta: {n: meta[n] for n in names if n in meta}


class EvalShards(torch.utils.data.IterableDataset):
    """This rank's (and DataLoader worker's) samples of ``shards`` -> batches of decoded media + kept metadata.

    Batches: ``{"order": Long[n, 2] (shard index, position), "keys", "meta", "media": {m: (rows Long[k],
    data [k, ...])}, "skipped": {reason: count}}``; the last batch of a reader may hold no item (only counts).
    """

    def __init__(self, shards: Sequence[str], transform, modalities: Sequence[str], *, keep: Keep,
                 batch_size: int = 64, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.shards, self.transform, self.modalities = list(shards), transform, list(modalities)
        self.keep, self.batch_size, self.rank, self.world_size = keep, int(batch_size), rank, world_size

    def samples(self) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """((shard index, position in the shard), raw sample) of this reader slot."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        slot, n_slots = self.rank * workers + worker, self.world_size * workers
        by_shard = len(self.shards) >= n_slots
        reader = ShardReader()  # local files, http(s), pipe:, s3:// / gs://, with retries (mlmm.data.shardio)
        seen = 0
        for i, shard in enumerate(self.shards):
            if by_shard and i % n_slots != slot:
                continue
            for pos, raw in enumerate(reader.read(shard)):
                if by_shard or seen % n_slots == slot:
                    yield (i, pos), raw
                seen += 1

    def item(self, raw: dict[str, Any], counts: collections.Counter) -> Optional[dict[str, Any]]:
        try:
            if "__error__" in raw:
                reason, _, detail = raw["__error__"].partition(": ")
                raise SampleError(reason, detail)
            raw = _parse(raw)
            meta = raw["json"]
            if not isinstance(meta, dict):
                raise SampleError("bad json", f"{raw['__key__']}: json is a {type(meta).__name__}, not an object")
            if "__error__" in meta:
                raise SampleError("bad json", f"{raw['__key__']}: {meta['__error__']}")
            if all(modality(m).member(raw) is None for m in self.modalities):
                raise SampleError(f"no {'/'.join(self.modalities)}", f"{raw['__key__']}: extensions "
                                  f"{sorted(k for k in raw if not k.startswith('__') and k != 'json')}")
            kept = self.keep(meta)
            try:
                media = self.transform(raw, self.modalities)
            except SampleError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever a decoder raises on one sample, it is that sample's
                raise SampleError(f"undecodable sample ({type(e).__name__})", f"{raw['__key__']}: {e}") from e
            return {"key": raw["__key__"], "meta": kept, "media": media}
        except SampleError as e:
            if not counts[e.reason]:
                log.warning("eval: skipping bad sample (%s) in %s: %s; further ones with this reason are only "
                            "counted", e.reason, raw.get("__url__", "?"), e)
            counts[e.reason] += 1
            return None

    def _batch(self, items: list, counts: collections.Counter) -> dict[str, Any]:
        media: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for m in self.modalities:
            rows = [i for i, (_, it) in enumerate(items) if m in it["media"]]
            if rows:
                media[m] = (torch.tensor(rows, dtype=torch.long),
                            torch.stack([items[i][1]["media"][m] for i in rows]))  # [k, ...]
        return {"order": torch.tensor([o for o, _ in items], dtype=torch.long).view(-1, 2),
                "keys": [it["key"] for _, it in items], "meta": [it["meta"] for _, it in items],
                "media": media, "skipped": dict(counts)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items: list[tuple[tuple[int, int], dict]] = []
        counts: collections.Counter = collections.Counter()
        reported: collections.Counter = collections.Counter()
        for order, raw in self.samples():
            it = self.item(raw, counts)
            if it is not None:
                items.append((order, it))
            if len(items) == self.batch_size:
                yield self._batch(items, counts - reported)
                reported, items = collections.Counter(counts), []
        yield self._batch(items, counts - reported)


@dataclass
class EmbeddedSet:
    """A streamed test set: item keys + kept metadata in shard order, and per-modality embeddings of its items."""

    keys: list[str]
    meta: list[dict]
    order: torch.Tensor  # Long[N, 2] (shard index, position)
    emb: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> [N_m, E]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> Long[N_m] (index into keys)
    skipped: dict[str, int] = field(default_factory=dict)

    def sorted(self) -> "EmbeddedSet":
        """Items in (shard, position) order, whatever reader or rank produced them."""
        n = len(self.keys)
        key = self.order[:, 0] * (int(self.order[:, 1].max()) + 1 if n else 1) + self.order[:, 1]  # [N]
        perm = torch.argsort(key, stable=True)  # new position -> old index
        new_of_old = torch.empty_like(perm)
        new_of_old[perm] = torch.arange(n)
        emb, rows = {}, {}
        for m, r in self.rows.items():
            nr = new_of_old[r]
            o = torch.argsort(nr, stable=True)
            emb[m], rows[m] = self.emb[m][o], nr[o]
        p = perm.tolist()
        return EmbeddedSet([self.keys[i] for i in p], [self.meta[i] for i in p], self.order[perm], emb, rows,
                           dict(self.skipped))

    def captions(self) -> dict[str, list[tuple[int, str]]]:
        """{lang: [(item index, caption), ...]} from the kept ``captions`` (see :func:`captions_of`)."""
        out: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
        for i, meta in enumerate(self.meta):
            for lang, caps in sorted((meta.get("captions") or {}).items()):
                out[lang].extend((i, c) for c in caps)
        return dict(out)


def _merge(parts: Sequence[EmbeddedSet]) -> EmbeddedSet:
    keys, meta, orders, skipped = [], [], [], collections.Counter()
    emb: dict[str, list] = collections.defaultdict(list)
    rows: dict[str, list] = collections.defaultdict(list)
    for p in parts:
        for m in p.emb:
            emb[m].append(p.emb[m])
            rows[m].append(p.rows[m] + len(keys))
        keys += p.keys
        meta += p.meta
        orders.append(p.order)
        skipped.update(p.skipped)
    return EmbeddedSet(keys, meta, torch.cat(orders) if orders else torch.empty(0, 2, dtype=torch.long),
                       {m: torch.cat(v) for m, v in emb.items()}, {m: torch.cat(v) for m, v in rows.items()},
                       dict(skipped))


def embed_test_set(model, shards: str | Sequence[str], modalities: Sequence[str], *, keep: Keep,
                   batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                   desc: str = "embed") -> EmbeddedSet:
    """Stream ``shards`` once and embed every item's ``modalities`` with ``model`` (an EvalModel); see module doc."""
    files = resolve_shards(shards) if isinstance(shards, str) else list(shards)
    rank, size = world()
    data = EvalShards(files, model.transform(), modalities, keep=keep, batch_size=batch_size, rank=rank,
                      world_size=size)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers > 0 else None)
    parts = []
    for batch in tqdm(loader, desc=desc, disable=not progress or rank != 0, leave=False, unit="batch"):
        emb = {m: model.encode(m, x) for m, (_, x) in batch["media"].items()}  # [k, E] each; the media are dropped
        parts.append(EmbeddedSet(batch["keys"], batch["meta"], batch["order"], emb,
                                 {m: r for m, (r, _) in batch["media"].items()}, batch["skipped"]))
    local = _merge(parts)
    return _merge(gather_objects(local) if size > 1 else [local]).sorted()
