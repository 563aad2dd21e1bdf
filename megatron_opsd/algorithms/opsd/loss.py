"""The fused OPSD loss: :func:`fused_token_divergence`, the objective of ``divergence.py`` from
final hidden states and this tensor-parallel rank's output-layer shard, never holding more than a
chunk's ``[chunk, V_local]`` logits (``chunks.py``), with closed-form gradients.

Gradient contract. Gradients flow to the student's hidden states and weight shard only. The
hidden-state gradient is the FULL gradient: the all-reduce over the TP group of the per-rank
partials (what ``copy_to_tensor_model_parallel_region`` does for a ``ColumnParallelLinear``)
happens inside, so the caller passes the plain replicated hidden states, not a ``copy_to_...``
output (with sequence parallelism: gathered with ``tensor_parallel_output_grad=False``). The
weight gradient is this rank's shard (padding rows zero), accumulated over chunks in fp32 unless
``weight_grad_fp32`` is False.

Four matmuls, not six. When autograd will need gradients, the forward pass already forms the
gradient products ``dlogits W`` and ``dlogits^T x`` chunk by chunk (4 large matmuls in all, as the
naive loss has) and backward scales them when the upstream gradient is the same for every token (a
sum, a token mean: the training case); any other upstream gradient (per-token weights, a multiplied
mask) recomputes exactly, chunk by chunk (2 more). Passing only the tokens that count, rather than
masking, costs nothing for the others.

The weight gradient into ``main_grad``. Under Megatron's ``DistributedDataParallel`` every
parameter has a ``main_grad`` buffer (fp32 with ``grad_reduce_in_fp32``) that DDP's backward hook
adds ``param.grad`` to. Like Megatron's ``gradient_accumulation_fusion``, ``main_grad_scale``
instead adds each chunk's weight gradient to ``student_weight.main_grad`` directly, no
``[V_local, H]`` gradient built. It happens in forward, so the caller promises the upstream
gradient (checked in backward): the loss is backpropagated exactly once with ``main_grad_scale``
for every token (Megatron's schedule with ``calculate_per_token_loss`` backpropagates
``per_token_loss.sum()`` times the optimizer's loss scale: ``main_grad_scale = loss scale``); only
when autograd will need gradients; ``weight_grad_fp32`` does not apply. Tied embeddings work: the
input embedding's part still reaches ``param.grad`` and the hook adds it once, which is why the
loss returns None rather than a dummy gradient flagged ``grad_added_to_main_grad``. A retained
graph's second backward recomputes and returns the weight gradient through autograd. DDP with
``overlap_grad_reduce`` is not supported for an untied output weight (its hook asserts that
``param.grad`` is not None).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from megatron_opsd.algorithms.opsd.chunks import Operands, Pass, SampledLogprobs, Scratch, run_chunks
from megatron_opsd.algorithms.opsd.divergence import LossConfig, check_targets
from megatron_opsd.models.vocab_parallel import all_reduce


def fused_token_divergence(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                           student_weight: torch.Tensor, teacher_weight: torch.Tensor, cfg: LossConfig,
                           target_ids: torch.Tensor | None = None, group: dist.ProcessGroup | None = None,
                           main_grad_scale: float | None = None, sampled: SampledLogprobs | None = None,
                           scratch: Scratch | None = None) -> torch.Tensor:
    """Per-token loss ``[N]`` (fp32; fp64 for fp64 inputs; identical on every TP rank).

    Args:
        student_hidden, teacher_hidden: ``[N, H]``, the same tokens in the same order, replicated
            across the TP group.
        student_weight, teacher_weight: ``[V_local, H]`` output-layer shards; rank ``r`` of ``group``
            holds rows ``[r * V_local, (r + 1) * V_local)`` of the padded vocabulary. Rows with a
            global index ``>= cfg.vocab_size`` are padding: never used, zero gradient.
        target_ids: ``[N]`` sampled token ids, for ``cfg.sampled_token`` only.
        group: the tensor-parallel group; None means no tensor parallelism.
        main_grad_scale: the weight gradient into ``student_weight.main_grad`` (module docstring);
            None returns it through autograd.
        sampled: also the student's log-probs of ``sampled.targets`` at ``sampled.temperature``
            (into ``sampled.values``, no gradient).
        scratch: the caller's logits-sized blocks, kept for its next calls; None: this call's own.
    """
    check_targets(cfg, target_ids)
    n, hidden = student_hidden.shape
    v_local = student_weight.shape[0]
    if teacher_hidden.shape != (n, hidden) or student_weight.shape != (v_local, hidden) \
            or teacher_weight.shape != (v_local, hidden):
        raise ValueError(f"shape mismatch: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
                         f"{tuple(teacher_hidden.shape)}, student_weight {tuple(student_weight.shape)}, "
                         f"teacher_weight {tuple(teacher_weight.shape)}")
    tp = 1 if group is None else dist.get_world_size(group)
    if v_local * tp < cfg.vocab_size:
        raise ValueError(f"{tp} shards of {v_local} rows cannot hold vocab_size={cfg.vocab_size}")
    for name, ids in (("target_ids", target_ids), ("sampled.targets", sampled and sampled.targets)):
        if ids is not None and ids.numel() != n:
            raise ValueError(f"{name} has {ids.numel()} entries for {n} tokens")
    frozen = not student_weight.requires_grad  # e.g. under LoRA: no weight gradient at all
    if main_grad_scale is not None and not frozen and getattr(student_weight, "main_grad", None) is None:
        raise ValueError("main_grad_scale needs student_weight.main_grad (a parameter of a Megatron "
                         "DistributedDataParallel module); pass main_grad_scale=None otherwise")
    precompute = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    into_main_grad = torch.is_grad_enabled() and student_weight.requires_grad and main_grad_scale is not None
    ops = Operands(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), target_ids,
                   cfg, group)
    return _FusedTokenDivergence.apply(student_hidden, student_weight, ops, precompute,
                                       main_grad_scale if into_main_grad else None, sampled, scratch or Scratch())


class _FusedTokenDivergence(torch.autograd.Function):
    """Backward takes one of three paths: the forward's products scaled by a uniform upstream
    gradient; those products as ``main_grad_scale`` promised (the weight's already in ``main_grad``);
    a recompute for any other upstream gradient."""

    @staticmethod
    def forward(ctx, hs: torch.Tensor, ws: torch.Tensor, ops: Operands, precompute: bool,
                main_grad_scale: float | None, sampled: SampledLogprobs | None, scratch: Scratch) -> torch.Tensor:
        ctx.cfg, ctx.group, ctx.main_grad_scale, ctx.scratch = ops.cfg, ops.group, main_grad_scale, scratch
        ctx.save_for_backward(ops.hs, ops.ws, ops.ht, ops.wt, ops.targets)
        asked = Pass(hidden_grad=precompute and ctx.needs_input_grad[0],
                     weight_grad=precompute and ctx.needs_input_grad[1], sampled=sampled)
        if main_grad_scale is not None:  # the products scaled as promised; the weight's into main_grad
            asked.scale, asked.weight_into = main_grad_scale, ws.main_grad
        loss, grad_h, grad_w = run_chunks(ops, asked, scratch)
        ctx.products = (grad_h, None if main_grad_scale is not None else grad_w) if precompute else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        ops = Operands(*ctx.saved_tensors, ctx.cfg, ctx.group)
        products, ctx.products = ctx.products, None  # used once; a second backward recomputes
        # grad_loss derives from the replicated per-token loss, so every TP rank takes the same path.
        uniform = products is not None and (grad_loss.numel() == 0 or bool((grad_loss == grad_loss[0]).all()))
        if products is not None and ctx.main_grad_scale is not None:
            _check_promise(ctx.main_grad_scale, grad_loss, uniform)
            grad_h, grad_w = products
        elif uniform:
            scale = grad_loss[0] if grad_loss.numel() else 0.0
            grad_h, grad_w = (g.mul_(scale) if g is not None else None for g in products)
        else:
            asked = Pass(hidden_grad=ctx.needs_input_grad[0], weight_grad=ctx.needs_input_grad[1], upstream=grad_loss)
            _, grad_h, grad_w = run_chunks(ops, asked, ctx.scratch)
        if grad_h is not None:
            all_reduce(grad_h, dist.ReduceOp.SUM, ops.group)
            grad_h = grad_h.to(ops.hs.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(ops.ws.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_promise(promised: float, grad_loss: torch.Tensor, uniform: bool) -> None:
    """The upstream gradient ``main_grad_scale`` promised for every token is the one backward got."""
    if uniform and not (grad_loss.numel() and bool(grad_loss[0] != promised)):
        return
    got = f"{float(grad_loss[0])} for every token" if uniform else "a per-token gradient"
    raise RuntimeError(
        f"fused_token_divergence(main_grad_scale={promised}) added the output-weight gradient for an upstream "
        f"gradient of {promised} per token to student_weight.main_grad in forward, but backward received {got}: "
        f"main_grad is now wrong (zero the grad buffers). Backpropagate per_token_loss.sum() times "
        f"main_grad_scale, or pass main_grad_scale=None")


__all__ = ["LossConfig", "SampledLogprobs", "Scratch", "fused_token_divergence"]
