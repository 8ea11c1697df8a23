"""DeepSpeed wrapper: one code path for `deepspeed` launches and single-process CPU runs.

`ds_config.json` holds ZeRO stage / precision / offload; batch size, accumulation and clipping
come from the YAML run config and are injected here, so the two cannot disagree.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlmm.config import ConfigError, RunConfig
from mlmm.data.batch import Batch
from mlmm.training.bf16_step import fuse_bf16_step
from mlmm.training.schedule import build_scheduler

log = logging.getLogger("mlmm")


class TrainModule(nn.Module):
    """Model + loss in one module, so DeepSpeed optimises both (the loss owns temperatures)."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.loss(self.model(batch), batch)


def resolve_precision(cfg: RunConfig, ds_cfg: dict, device: torch.device) -> str:
    """fp32 | bf16 | fp16: train.precision wins; else ds_config's explicit flags; auto = bf16 on CUDA."""
    p = cfg.train.precision
    if p == "auto":
        if ds_cfg.get("fp16", {}).get("enabled") is True:
            p = "fp16"
        elif ds_cfg.get("bf16", {}).get("enabled") is True:
            p = "bf16"
        elif device.type == "cuda" and torch.cuda.is_bf16_supported():
            p = "bf16"
        else:
            p = "fp32"
    if p == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision: fp16 training needs a GPU; use bf16 or fp32 on CPU")
    return p


def build_ds_config(cfg: RunConfig, device: torch.device) -> dict:
    path = Path(cfg.train.ds_config)
    if not path.is_file() and cfg.config_path:  # also look next to the repo root of the YAML
        alt = Path(cfg.config_path).resolve().parents[2] / cfg.train.ds_config
        path = alt if alt.is_file() else path
    ds: dict[str, Any] = {}
    if path.is_file():
        ds = json.loads(path.read_text())
    elif cfg.train.ds_config:
        raise ConfigError(f"train.ds_config: {cfg.train.ds_config} not found")
    ds = copy.deepcopy(ds)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: {key}: set it in the YAML run config (data/train sections), not in ds_config")
    precision = resolve_precision(cfg, ds, device)
    # mlmm relies on DeepSpeed skipping an update whose gradients are not finite: it is the NaN guard, and how one
    # failing rank stops every rank (its poisoned gradient makes every rank skip, then they decide together)
    for key, where in (("check_grad_overflow", "bf16"), ("compute_grad_norm", "zero_optimization")):
        if ds.get(where, {}).get(key) is False:
            raise ConfigError(f"{path}: {where}.{key}: false turns off DeepSpeed's skip of non-finite updates, which "
                              f"mlmm's NaN guard (train.nan_patience) and its collective abort rely on; remove it")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    if cfg.train.zero_stage is not None:
        zero["stage"] = cfg.train.zero_stage
    if device.type == "cpu":  # CUDA-only knobs
        zero.pop("overlap_comm", None)
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        # ZeRO-Offload: mlmm's fused torch AdamW steps the fp32 partitions on the CPU (DeepSpeed otherwise demands
        # its own CPU Adam, a JIT-compiled op); an explicit setting in ds_config wins
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.data.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=cfg.train.grad_clip,
        steps_per_print=10**9,  # mlmm logs itself
        wall_clock_breakdown=False,
    )
    return ds


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings of positions/classes and temperatures (as CLIP)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name or "logit_scale" in name or "norm" in name.lower()
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def initialize(cfg: RunConfig, module: nn.Module, device: torch.device):
    """deepspeed.initialize with a torch AdamW and the warmup-cosine schedule; returns (engine, ds_config).

    ``module`` arrives complete, pretrained weights loaded (no ``deepspeed.zero.Init``); under ZeRO-3 DeepSpeed
    partitions it here, broadcasting rank 0's values, so the partitions hold exactly the loaded weights (tested).
    """
    import deepspeed

    ds_cfg = build_ds_config(cfg, device)
    t = cfg.train
    # fused AdamW (one kernel over each flat ZeRO buffer; CUDA, and CPU since torch 2.4): 1 pass over memory
    optimizer = torch.optim.AdamW(param_groups(module, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  fused=True)
    scheduler = build_scheduler(optimizer, warmup_steps=t.warmup_steps, max_steps=t.max_steps,
                                min_lr_ratio=t.min_lr_ratio)
    # the exact values of frozen parameters: a bf16 / fp16 engine keeps only rounded copies of them (no optimizer
    # master), and the export should not round weights it never trained
    frozen = {id(p): p.detach().float().cpu().clone() for p in module.parameters() if not p.requires_grad} \
        if ds_cfg["bf16"]["enabled"] or ds_cfg["fp16"]["enabled"] else {}
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg)
    engine.mlmm_frozen_fp32 = frozen
    skip_single_replica_allreduce(engine)
    guard_nonfinite_updates(engine)
    fuse_bf16_step(engine)  # bf16 at ZeRO-0: DeepSpeed's step, bit for bit, with fewer passes over the gradients
    return engine, ds_cfg


def guard_nonfinite_updates(engine) -> bool:
    """Make the optimizer skip an update whose gradients are not finite where DeepSpeed itself does not.

    DeepSpeed (>= 0.19.8) skips such updates in its ZeRO-1/2/3 and bf16 optimizers and reports it through
    ``engine.was_step_applied()``; at ZeRO-0 in fp32 it hands the gradients straight to the torch optimizer. There
    this wraps ``optimizer.step`` with the same check (one host read of the gradient norm's finiteness per update,
    as DeepSpeed's own check does) and sets ``optimizer.overflow``, which DeepSpeed reads to skip the LR scheduler
    and report the step as not applied. Returns whether the guard was installed.
    """
    opt = engine.optimizer
    if hasattr(opt, "overflow") or not isinstance(opt, torch.optim.Optimizer):
        return False
    real_step = opt.step

    def step(closure=None):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
        opt.overflow = not finite
        if finite:
            return real_step(closure)
        opt.zero_grad(set_to_none=True)
        return None

    opt.overflow = False
    opt.step = step
    return True


def skip_single_replica_allreduce(engine) -> bool:
    """ZeRO-0 with one data-parallel replica: replace DeepSpeed's backward all-reduce by what it leaves behind.

    There it flattens every gradient into one bucket (a full extra copy of the gradients), all-reduces the bucket
    with itself, scales it by 1/1 and copies it back: memory traffic and a transient gradient-sized buffer for an
    identity. Its only lasting effect is that parameters without a gradient get a zero one (so AdamW still moves
    them by their momentum); the replacement does just that, so training is bit-identical (tested). ZeRO >= 1
    reduces inside its optimizer and is left alone. Returns whether the all-reduce was replaced.
    """
    if engine.zero_optimization_stage() != 0 or getattr(engine, "dp_world_size", 2) != 1:
        return False
    module = engine.module

    def zero_fill_missing_grads(*args, **kwargs) -> None:
        for p in module.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    engine.allreduce_gradients = zero_fill_missing_grads  # instance attribute: DeepSpeed's backward calls it
    return True


def restore_torch_linear() -> None:
    """Undo DeepSpeed's process-wide swap of ``torch.nn.functional.linear`` for its ZeRO-3 version (made when a ZeRO-3
    engine is built; "this will persist unless manually reset"): a later trainer in the same process then computes
    as in a fresh process (its backward differs from aten's in the last bits)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Patched

    original = getattr(Patched, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def compile_towers(model: nn.Module) -> None:
    """``torch.compile`` each tower's ``forward_tokens`` and ``forward`` (the model calls the latter when no head
    reads the tokens), in place.

    Parameter names stay as they are (checkpoints and exports are unaffected); the DeepSpeed engine
    itself is not compiled. Varying text lengths compile a few shape variants, then a dynamic one; packed
    padding (data-dependent token counts) is a graph break.
    """
    for tower in model.towers.values():
        tower.forward_tokens = torch.compile(tower.forward_tokens)
        tower.forward = torch.compile(tower.forward)


def compute_dtype(ds_cfg: dict) -> torch.dtype:
    if ds_cfg["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_cfg["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


def full_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copy of `module`'s parameters and buffers, gathering ZeRO-3 partitions (collective).

    In bf16 / fp16 the parameters come from the optimizer's fp32 master copy (ZeRO-1/2/3: DeepSpeed's
    ``safe_get_full_fp32_param``, assembled from every rank's partition; ZeRO-0: its per-parameter fp32 copies), not
    from the rounded working copy the forward pass uses; frozen parameters from their exact values before the
    engine rounded them.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage3 else contextlib.nullcontext()
    with ctx:
        out = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
               for k, v in module.state_dict().items()}
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return out  # fp32: the parameters are the masters
    frozen = getattr(engine, "mlmm_frozen_fp32", {})
    opt = engine.optimizer  # ZeRO-0: DeepSpeed's unfused fp16/bf16 optimizer keeps one fp32 copy per parameter
    whole = {id(lp): hp for lps, hps in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
             if isinstance(hps, (list, tuple)) for lp, hp in zip(lps, hps)}
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for p in params:  # the same order on every rank: the gathers below are collectives
        master = safe_get_full_fp32_param(p) if p.requires_grad else None
        master = whole.get(id(p)) if master is None else master
        if master is None and id(p) in frozen:
            master = frozen[id(p)]
        if master is None:
            log.warning("export: %s has no fp32 master copy this exporter can read (%s): exported from its %s "
                        "working copy", names[id(p)][0], type(opt).__name__, str(p.dtype).replace("torch.", ""))
            continue
        for name in names[id(p)]:
            out[name] = master.detach().float().cpu().clone().reshape(out[name].shape)
    return out
