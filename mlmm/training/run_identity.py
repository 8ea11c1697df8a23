"""Which config changes make a resumed run another run, and which are edits the resumed run applies.

Every checkpoint stores the run's resolved config plus fingerprints of what paths point to (:func:`run_record`).
On resume :func:`compare` sorts each changed key by the longest matching prefix in :data:`IDENTITY` (refused,
naming the keys; ``train.resume=force`` overrides) or :data:`EDITABLE` (applied and logged). A key in neither
list is refused: a new config field must be classified here (a test checks that every field is).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from mlmm.config import RunConfig

# A change here makes the run another run: refused (key -> why it defines the run).
IDENTITY: dict[str, str] = {
    "seed": "seeds the weights' initialisation and the random draws of the run",
    "model": "the architecture (towers, widths, heads): the weights would not fit or would mean another model",
    "model.text.tokenizer": "compared by vocabulary, so a moved tokenizer folder is fine",
    "loss": "the objective being optimised, with its own state (temperatures, memories)",
    "data.train_shards": "compared by content (shard names and sample counts), so a moved shard folder is fine",
    "data.parallel_jsonl": "compared by content (the JSONL's sha1): the captions the shards are prepared from",
    "data.batch_size": "the batch every step averages over, and what one step of the data position is",
    "data.shuffle_buffer": "the sample order (the data position is replayed for this buffer size)",
    "data.seed": "the shard and sample order",
    "data.languages": "which captions the run trains on",
    "data.language_policy": "which caption each sample contributes",
    "data.text_field": "which text is the input",
    "train.grad_accum": "the batch of each optimizer step",
    "train.precision": "the numerics and the optimizer state saved (compared resolved: auto -> bf16 | fp32)",
    "train.zero_stage": "how the optimizer state is partitioned in the checkpoint (compared resolved)",
    "train.init_from": "the weights the run started from",
    "train.trainable": "which parameters train: the optimizer's parameter groups",
}

# Edits a resumed run applies, and logs (key -> why that is safe).
EDITABLE: dict[str, str] = {
    "name": "a label in logs and the model card",
    "output_dir": "where the run lives: the folder it is resumed from, wherever it was moved",
    "data.num_workers": "loader layout: the rest of the pass is re-split (mlmm.data.resplit); refused if it cannot be",
    "data.max_bad_fraction": "an abort threshold, not the data",
    "data.shard_sizes": "where sample counts are read from; the counts themselves are compared (data.train_shards)",
    "data.io_retries": "how often a failing read is retried, not what is read",
    "data.io_backoff": "how long to wait before a retry, not what is read",
    "data.normalize_on_device": "where the same normalisation runs",
    "data.decode_on_device": "where the same JPEG decoding runs",
    "data.logmel_on_device": "where the same log-mel spectrogram is computed",
    "train.max_steps": "how long the run goes; the cosine schedule is recomputed for it",
    "train.lr": "the schedule's peak, set on the restored optimizer and scheduler",
    "train.warmup_steps": "the schedule's shape, recomputed at resume",
    "train.min_lr_ratio": "the schedule's floor, recomputed at resume",
    "train.weight_decay": "set on the restored optimizer's decayed parameter group",
    "train.betas": "set on the restored optimizer's parameter groups",
    "train.eps": "set on the restored optimizer's parameter groups",
    "train.grad_clip": "read from the DeepSpeed config, built from this config at every start",
    "train.ds_config": "a file path; its ZeRO stage and precision are compared resolved (train.zero_stage/precision)",
    "train.log_every": "read every step",
    "train.save_every": "read every step",
    "train.keep_checkpoints": "read at every save",
    "train.resume": "how to resume, not what",
    "train.trust_checkpoint": "how to resume, not what",
    "train.nan_patience": "an abort threshold, read every step",
    "train.compile": "the same computation, compiled (parameter names are unchanged)",
    "train.gradient_checkpointing": "the same computation, activations recomputed in backward",
    "train.tensorboard": "logging only",
    "train.progress": "the progress bar only",
}

# keys compared through a fingerprint of what they resolve to, not as written
BY_CONTENT = {"data.train_shards": "shards", "data.parallel_jsonl": "parallel_jsonl",
              "model.text.tokenizer": "tokenizer", "train.precision": "precision", "train.zero_stage": "zero_stage"}


def classify(key: str) -> Optional[str]:
    """'identity' | 'editable' | None (unclassified) by the longest prefix of dotted `key` in either list."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in IDENTITY:
            return "identity"
        if prefix in EDITABLE:
            return "editable"
    return None


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def shards_fingerprint(data_cfg) -> dict[str, Any]:
    """{"n": shards, "samples": total (None if unknown), "digest": of names + counts} of ``data.train_shards``
    (counts from ``data.shard_sizes`` or the index.json / sizes.json beside the shards)."""
    from mlmm.data.shards import resolve_shards
    from mlmm.data.shardio import ShardReader, shard_name

    shards = resolve_shards(data_cfg.train_shards)
    counts = ShardReader.from_config(data_cfg).counts(shards)
    names = [shard_name(s) or s for s in shards]
    total = sum(counts) if all(c is not None for c in counts) else None
    return {"n": len(shards), "samples": total, "digest": _digest(list(zip(names, counts)))}


def tokenizer_fingerprint(tokenizer) -> Optional[str]:
    return None if tokenizer is None else _digest(sorted(tokenizer.get_vocab().items()))


def run_record(cfg: RunConfig, tokenizer, ds_config: dict) -> dict[str, Any]:
    """What a checkpoint stores to recognise its run: the resolved config and fingerprints of its inputs.

    ``shards`` is None while shards prepared from ``data.parallel_jsonl`` do not exist yet (a first run): the
    Trainer fills it, and ``teachers``, once the loss is built (:func:`check_built`)."""
    from mlmm.distill.prepare import file_sha1

    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    jsonl = cfg.data.parallel_jsonl
    try:
        shards = shards_fingerprint(cfg.data)
    except FileNotFoundError:
        if not jsonl:
            raise
        shards = None
    return {"config": json.loads(json.dumps(cfg.to_dict(), default=str)), "shards": shards,
            "parallel_jsonl": file_sha1(jsonl) if jsonl and Path(jsonl).is_file() else None,
            "tokenizer": tokenizer_fingerprint(tokenizer), "precision": precision,
            "zero_stage": int(ds_config.get("zero_optimization", {}).get("stage", 0))}


def check_built(saved: Optional[dict[str, Any]], current: dict[str, Any], cfg: RunConfig, loss) -> list[str]:
    """Complete `current` with what exists only once the loss is built (the teachers' weight fingerprints; shards
    prepared from ``data.parallel_jsonl``) -> the differences from the resumed checkpoint's record `saved`."""
    from mlmm.distill.prepare import loss_teachers

    current["teachers"] = sorted(t.fingerprint for t in loss_teachers(loss))
    if current["shards"] is None:
        current["shards"] = shards_fingerprint(cfg.data)
    if saved is None:
        return []
    out = []
    if saved.get("teachers") != current["teachers"]:
        out.append(f"loss teacher weights: {saved.get('teachers')} -> {current['teachers']}")
    if saved.get("shards") != current["shards"]:
        out.append(f"data.train_shards (as prepared from data.parallel_jsonl): {_shards(saved.get('shards'))} -> "
                   f"{_shards(current['shards'])}")
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _default(cfg: RunConfig, key: str) -> Any:
    """The dataclass default of dotted `key` in `cfg` (what a field added after a checkpoint meant), or a marker."""
    obj: Any = cfg
    *parents, name = key.split(".")
    for p in parents:
        obj = getattr(obj, p, None) if dataclasses.is_dataclass(obj) else None
    fields = {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
    f = fields.get(name)
    if f is None:
        return _MISSING
    value = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else _MISSING)
    return json.loads(json.dumps(value, default=str)) if value is not _MISSING else _MISSING


_MISSING = object()


def _short(v: Any) -> str:
    text = "(unset)" if v is _MISSING else json.dumps(v, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def compare(saved: dict[str, Any], current: dict[str, Any], cfg: RunConfig, *, saved_world: int, world: int,
            resplit_possible: bool) -> tuple[list[str], list[str]]:
    """-> (refused, edits): ``"key: old -> new"`` lines of the changes that make another run / that are applied."""
    old, new = _flatten(saved.get("config", {})), _flatten(current["config"])
    refused, edits = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a is _MISSING:
            a = _default(cfg, key)  # a field added after the checkpoint: unchanged if still at its default
        if a == b:
            continue
        line = f"{key}: {_short(a)} -> {_short(b)}"
        content = BY_CONTENT.get(key)
        if content is not None:
            if saved.get(content) == current.get(content):
                edits.append(line + " (same content)")
            continue  # differing content is reported below
        kind = classify(key)
        if kind == "editable":
            edits.append(line)
        else:
            refused.append(line if kind else line + " (not classified in mlmm/training/run_identity.py)")
    for content, key in ((c, k) for k, c in BY_CONTENT.items()):
        a, b = saved.get(content), current.get(content)
        if a != b:
            if content == "shards":
                detail = f"{_shards(a)} -> {_shards(b)}"
            elif content == "tokenizer":
                detail = "another vocabulary"
            elif content == "parallel_jsonl":
                detail = "another file content (sha1)"
            else:
                detail = f"{_short(a)} -> {_short(b)}"
            refused.append(f"{key}: {detail}")
    layout_old = (saved_world, max(int(old.get("data.num_workers") or 0), 1))  # 0 workers = 1 stream slot
    layout_new = (world, max(int(new.get("data.num_workers") or 0), 1))
    if layout_old != layout_new:
        if not resplit_possible:
            refused.append(f"world size x data.num_workers: {saved_world} x {layout_old[1]} -> {world} x "
                           f"{layout_new[1]} (the shards have no index.json sample counts, so the data position "
                           "cannot be re-split)")
        elif saved_world != world:
            edits.append(f"world size: {saved_world} -> {world} (weights and optimizer through a universal "
                         "checkpoint, the rest of the pass re-split)")
    return refused, edits


def _shards(fp: Any) -> str:
    if not isinstance(fp, dict):
        return "(unknown)"
    samples = fp.get("samples")
    return (f"{fp.get('n')} shards" + (f" / {samples} samples" if samples is not None else "") +
            f" [{fp.get('digest')}]")
