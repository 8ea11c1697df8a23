"""Train an mlmm model on samples decoded once (for the small benchmarks on a shared 2-core CPU).

The Trainer's streaming pipeline re-decodes every sample every epoch (about 0.1-0.3 s per FSDD clip
or mp4 on a loaded 2-core machine), which dominates a many-epoch run over a few hundred samples.
Here the same :class:`~mlmm.data.preprocess.Preprocessor` (train=False: deterministic) decodes each
sample once, with one row per caption language (``all_languages``); training then draws random
batches of rows, runs the same :class:`~mlmm.models.model.MultimodalModel` and registered loss,
with AdamW + warmup/cosine (:mod:`mlmm.training.schedule`) and gradient clipping, and exports with
:func:`mlmm.hub.save_pretrained`. Rows of one sample in a batch are never each other's negatives
(the losses group rows by key).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch


def decode_rows(shards: str, preprocessor, languages=None) -> list[dict]:
    from mlmm.data.shards import iter_samples, resolve_shards
    from mlmm.data.transforms import SampleError

    rows = []
    for raw in iter_samples(resolve_shards(str(shards))):
        try:
            rows.extend(preprocessor(raw, random.Random(0), language_policy="all_languages", languages=languages))
        except SampleError:
            continue
    return rows


def train_cached(cfg, *, log_every: int = 50, log=print, decode=None):
    """Build model + loss from a RunConfig, train ``cfg.train.max_steps`` steps on decoded rows; -> (model, history).

    ``decode(shards, preprocessor) -> rows`` replaces :func:`decode_rows` (e.g. one row per caption)."""
    from transformers import AutoTokenizer

    from mlmm.data.preprocess import Preprocessor
    from mlmm.models.model import MultimodalModel
    from mlmm.registry import LOSSES
    from mlmm.training.schedule import build_scheduler

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = AutoTokenizer.from_pretrained(cfg.model.text.tokenizer)
    model = MultimodalModel(cfg.model, tok)
    loss_fn = LOSSES.get(cfg.loss.name).cls(cfg.loss, model.modalities)
    pre = Preprocessor(cfg.model, tok, train=False)
    t0 = time.time()
    rows = (decode(cfg.data.train_shards, pre) if decode is not None
            else decode_rows(cfg.data.train_shards, pre, cfg.data.languages))
    log(f"decoded {len(rows)} rows in {time.time() - t0:.0f} s")
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    t = cfg.train
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=t.betas, eps=t.eps)
    sched = build_scheduler(opt, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr_ratio=t.min_lr_ratio)
    history, t0 = [], time.time()
    model.train()
    for step in range(1, t.max_steps + 1):
        batch = pre.collate(rng.sample(rows, min(cfg.data.batch_size, len(rows))))
        out = loss_fn(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == t.max_steps:
            terms = {k: round(float(v.detach()), 4) for k, v in out.items()}
            history.append({"step": step, **terms})
            log(f"step {step} {terms} ({time.time() - t0:.0f} s)")
    model.eval()
    return model, history


def export(model, cfg, out_dir: Path) -> Path:
    from mlmm.hub import save_pretrained

    return save_pretrained(model, out_dir, run_config=cfg)
