"""bf16 at ZeRO-0: DeepSpeed's optimizer step with the same result and fewer passes over the gradients.

At ZeRO-0 in bf16, DeepSpeed wraps the torch optimizer in its unfused fp16/bf16 optimizer (bf16 weights in the model,
one fp32 master copy per parameter in the optimizer). Its ``step`` reads the gradients many times:

1. an overflow check: ``amax`` and ``amin`` of every bf16 gradient (two passes);
2. the gradient norm: a fresh fp32 copy of every gradient (``grad.float()``), then its norm;
3. a second fp32 copy of every gradient, which the torch optimizer steps with;
4. ``grad.mul_(1 / scale)`` on every fp32 gradient, also when the scale is 1 (bf16 has no loss scale; it differs
   from 1 only when gradient clipping applies);
5. the torch optimizer's step (fused AdamW), then a copy of every fp32 master weight into its bf16 parameter.

:func:`fuse_bf16_step` replaces it on one engine by a step that converts each gradient once, takes the norm of that
copy, multiplies only by a scale other than 1, and skips the update when the norm is not finite, which is exactly
when some gradient holds an inf or a NaN (or the norm overflows, which DeepSpeed's step also skips). The norm, the
gradients the optimizer sees, the update and the skip are those of DeepSpeed's step, bit for bit (tested against
it). Passes 1 and one of 2 / 3 are gone, and 4 where the scale is 1.
"""
from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger("mlmm")


def fuse_bf16_step(engine) -> bool:
    """Install the fused step on ``engine``'s optimizer where it applies (bf16, ZeRO-0, DeepSpeed's unfused
    optimizer without loss scaling, model parallelism or MoE); -> whether it was installed."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    opt = engine.optimizer
    if type(opt) is not FP16_UnfusedOptimizer or opt.low_precision_dtype != torch.bfloat16:
        return False
    from deepspeed.moe.utils import is_moe_param

    scale = opt.loss_scale_config
    if (opt.fused_lamb_legacy or opt.mpu is not None or opt.custom_loss_scaler or scale.cur_scale != 1.0
            or scale.dynamic_loss_scale or any(is_moe_param(p) for g in opt.fp16_groups for p in g)):
        return False
    opt.step = types.MethodType(_fused_step, opt)
    return True


def _group_norm(grads: list[torch.Tensor]) -> float:
    """DeepSpeed's ``get_weight_norm`` (2-norm, one process) on fp32 gradients: -1 when not finite."""
    total = 0.0
    for g in grads:
        total += g.norm(2.0) ** 2.0  # accumulated as DeepSpeed does: a python float, then a 0-d tensor
    norm = torch.tensor([float(total)], dtype=torch.float32)[0].item() ** (1.0 / 2.0)
    return -1 if norm in (float("inf"), -float("inf")) or norm != norm else norm


def _fused_step(self, closure=None):
    """``FP16_UnfusedOptimizer.step`` (bf16, one process) with each gradient converted and read once."""
    from deepspeed.runtime.utils import get_global_norm, is_invalid_grad_norm

    norm_groups = []
    for fp32_group, bf16_group in zip(self.fp32_groups, self.fp16_groups):
        grads = []
        for fp32_param, bf16_param in zip(fp32_group, bf16_group):
            if bf16_param.grad is None:
                fp32_param.grad = torch.zeros(bf16_param.size(), dtype=fp32_param.dtype, device=fp32_param.device)
            else:
                fp32_param.grad = bf16_param.grad.to(fp32_param.dtype)
                grads.append(fp32_param.grad)
        norm_groups.append(_group_norm(grads) if grads else 0.0)
    self._global_grad_norm = get_global_norm(norm_list=norm_groups)
    if is_invalid_grad_norm(self._global_grad_norm):  # an inf / NaN gradient (or a norm past fp32's range)
        return self._skip_invalid_grad_norm()
    self.overflow = False
    self._update_scale(False)
    combined_scale = self.unscale_and_clip_grads(self._global_grad_norm, apply_scale=False)
    if combined_scale != 1.0:
        for group in self.fp32_groups:
            for param in group:
                param.grad.mul_(1.0 / combined_scale)
    self.optimizer.step()
    for fp32_group, bf16_group in zip(self.fp32_groups, self.fp16_groups):
        for fp32_param, bf16_param in zip(fp32_group, bf16_group):
            fp32_param.grad = None
            bf16_param.data.copy_(fp32_param.data)
    return self.overflow
