"""Megatron DDP wrapping, optimizer, LR schedule, and a guarded optimizer step.

The trainer's loss is a global token mean (see ``train/step.py``). Megatron implements that
natively when ``calculate_per_token_loss`` is set: the loss function returns (sum, token count),
the schedule neither divides by the micro-batch count nor DDP by the DP size, and
``finalize_model_grads`` all-reduces the token count over DP and scales the gradients by its
inverse. ``wrap_for_training`` sets that up, so the gradient is independent of how the batch is
split into micro-batches and DP ranks.

Precision follows the model: a bf16 model gets Megatron's mixed-precision optimizer with fp32
master weights (GPU), an fp32 model (CPU) a plain fp32 AdamW. On CPU that AdamW is torch's fused
kernel (:func:`fuse_cpu_adam`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from pydantic import Field

from megatron_opsd.parallel import ParallelGroups
from megatron_opsd.section import Section


class OptimConfig(Section):
    """AdamW with the paper's defaults (lr 5e-6, grad-norm clip 0.1, constant LR)."""

    lr: float = Field(5e-6, gt=0, description="peak learning rate (after warm-up)")
    min_lr: float = Field(0.0, ge=0, description="where the linear / cosine decay ends, at the last step")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.999, description="AdamW beta2")
    adam_eps: float = Field(1e-8, description="AdamW epsilon")
    clip_grad: float = Field(0.1, ge=0, description="max global gradient norm; 0: no clipping")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        default="constant", description="learning rate after warm-up: constant, or decayed to min_lr over the run")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up from 0 to lr")
    distributed_optimizer: bool | None = Field(
        default=None, description="shard optimizer state over DP ranks; None: exactly when DP > 1 (set it to "
        "resume a checkpoint at another DP size)")


def wrap_for_training(chunks: Sequence[torch.nn.Module], use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """Set the chunks' shared config up for training (per-token loss normalisation; with PP, the
    schedule exchanges activation shapes: packed rows differ in length) and wrap them in Megatron DDP."""
    config = chunks[0].config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    config.variable_seq_lengths = chunks[0].groups.pp_size > 1
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def use_distributed_optimizer(cfg: OptimConfig, groups: ParallelGroups) -> bool:
    if cfg.distributed_optimizer is not None:
        return cfg.distributed_optimizer
    return groups.dp_size > 1


def build_optimizer(
    cfg: OptimConfig, chunks: Sequence[DistributedDataParallel], total_steps: int
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW over the DDP-wrapped chunks; bf16 models get fp32 master weights, fp32 models none."""
    model_config = chunks[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",  # Megatron's "adam" is AdamW (decoupled weight decay)
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=model_config.bf16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=chunks[0].ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, list(chunks))
    fuse_cpu_adam(optimizer)
    model_config.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=max(total_steps, cfg.warmup_steps + 1),
        lr_decay_style=cfg.schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def fuse_cpu_adam(optimizer: MegatronOptimizer) -> None:
    """Switch torch Adam(W)s over CPU parameters to torch's fused kernel (the same update).

    Without TE or Apex, Megatron builds ``torch.optim.AdamW`` with its default implementation,
    which on CPU is the single-tensor loop: each parameter's update allocates parameter-sized
    temporaries (``sqrt``, the division), the run's peak memory once the vocabulary-sized embedding's
    turn comes, and it is several times slower. Call again after loading a state dict: torch
    restores the saved groups' settings with it.
    """
    for opt in optimizer.chained_optimizers:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam):  # AdamW derives from it; TE/Apex FusedAdam do not
            continue
        if all(p.device.type == "cpu" for group in inner.param_groups for p in group["params"]):
            for group in [inner.defaults, *inner.param_groups]:
                group["fused"], group["foreach"] = True, False


@torch.no_grad()
def guarded_step(optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler) -> tuple[bool, float]:
    """Clip and apply the update unless the gradient norm is non-finite; return (applied, norm).

    Megatron's own ``step`` would apply a NaN update (its clip coefficient is NaN and not < 1), so
    this runs the same phases (prepare, global norm, clip, step) with a finite check in between.
    The clip scales the main grads as Megatron's ``clip_grad_by_total_norm_fp32`` does, without its
    CUDA-only type assertion.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in optimizer.chained_optimizers:
        coeff = opt.config.clip_grad / (grad_norm + 1.0e-6)
        grads = [p.grad for p in opt.get_parameters() if p.grad is not None]
        if opt.config.clip_grad > 0 and coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)
    optimizer.step_with_ready_grads()
    scheduler.step(increment=1)
    return True, grad_norm


def zero_grads(chunks: Sequence[DistributedDataParallel], optimizer: MegatronOptimizer) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
