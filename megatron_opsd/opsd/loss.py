"""OPSD per-token divergence between teacher and student next-token distributions.

Two implementations of one objective:

- :func:`dense_token_divergence` takes full logits ``[N, V]`` and lets autograd differentiate. It is
  the readable reference that defines the semantics; tests run it in float64.
- :func:`fused_token_divergence` takes final hidden states and this tensor-parallel rank's
  output-layer shard, recomputes logits ``chunk_size`` tokens at a time and never holds more than
  ``[chunk_size, V_local]`` of them. Only per-token statistics (max, sums) cross TP ranks, as in
  Megatron's ``vocab_parallel_cross_entropy``. Gradients are closed-form (below).

Notation, per token: ``z_S = student_logits / T`` and ``z_T = teacher_logits / T`` over the kept
entries ``K`` (the first ``vocab_size`` rows of the padded vocabulary, further restricted to the
teacher's top-k when ``top_k`` is set), ``p = softmax(z_S)``, ``q = softmax(z_T)`` over ``K``.
The elementwise terms ``l_v`` and the loss ``sum_v min(l_v, tau)`` (``clip = tau``; no min when
``clip`` is None) are:

- forward KL(q || p):  ``l_v = q_v log(q_v / p_v)``
- reverse KL(p || q):  ``l_v = p_v log(p_v / q_v)``
- JSD_beta (GKD):      ``l_v = beta q_v log(q_v / m_v) + (1 - beta) p_v log(p_v / m_v)``,
  ``m = beta q + (1 - beta) p``; ``beta = 0`` / ``1`` are forward / reverse KL.

Gradient w.r.t. the student logits. Each ``l_v`` depends on ``p`` only through ``p_v``; with the
clip mask ``a_v = [l_v <= tau]`` (all ones without clipping) and ``h_v = a_v p_v dl_v/dp_v``, the
softmax Jacobian gives ``dL/dz_S = h - p * sum_v h_v``, where

- forward KL:  ``h = -a q``                          (no clip: ``dL/dz_S = p - q``)
- reverse KL:  ``h = a p (log p - log q + 1)``       (no clip: ``p (log p - log q - KL)``)
- JSD_beta:    ``h = a (1 - beta) p (log p - log m)``

and ``dL/dlogits = dL/dz_S / T``. For a token with hidden ``x`` and output weight ``W``
(``logits = x W^T``): ``dL/dx = dlogits W`` and ``dL/dW = dlogits^T x``, summed over tokens.

Sampled-token variant: ``A = log q_y - log p_y`` (detached), loss ``-A log p_y``,
``dL/dz_S = A (p - onehot(y))``.

Top-k ties: every entry whose teacher logit equals the k-th largest is kept, so the kept set does
not depend on the tensor-parallel size or on sort order.

Precision and memory of the fused loss: the matmuls run in the input dtype (bf16 GEMMs accumulate
in fp32), logits are cast to fp32 (fp64 stays fp64) before any softmax statistic, and one chunk
holds two ``[chunk_size, V_local]`` fp32 tensors at a time for forward KL over the whole vocabulary
(its per-entry work runs through a cache-sized tile), three otherwise (plus, with ``weight_grad_chunks``
``k > 1``, the logit gradients of ``k`` chunks in the input dtype). Besides that, gradients need an
fp32 ``[N, H]`` hidden-gradient buffer and a ``[V_local, H]`` weight-gradient accumulator, except
in training under Megatron DDP with ``main_grad_scale`` (see :func:`fused_token_divergence`), where
the weight gradient goes straight into the parameter's fp32 ``main_grad`` buffer, which exists anyway.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch.autograd.function import once_differentiable

from megatron_opsd.section import Section

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
CPU_CHUNK, GPU_CHUNK = 128, 2048  # default tokens per chunk (LossConfig.chunk_size)


class LossConfig(Section):
    """The OPSD loss. See the module docstring for the exact math."""

    divergence: Divergence = Field(
        default="forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); "
        "jsd: generalized JSD (needs beta)")
    beta: float | None = Field(None, ge=0.0, le=1.0, description="JSD mixture weight of the teacher; jsd only")
    temperature: float = Field(1.1, gt=0.0, description="both logit sets are divided by it")
    clip: float | None = Field(0.05, gt=0.0, description="per-vocabulary-entry tau; None = off")
    top_k: int | None = Field(None, ge=1, description="teacher's global top-k, renormalized; None = full vocab")
    sampled_token: bool = Field(False, description="-A log p_S(y) on the sampled token instead of a divergence")
    vocab_size: int = Field(ge=1, description="true vocabulary size; output-layer rows beyond it are padding")
    chunk_size: int | None = Field(None, ge=1, description="tokens per chunk of the fused loss; None: 128 on CPU "
                                   "(two [chunk_size, V_local] fp32 blocks stay allocated between steps, three for "
                                   "divergences other than forward KL or with top_k), 2048 on a GPU (few large "
                                   "GEMMs, two TP all-reduces per chunk)")
    weight_grad_fp32: bool = Field(True, description="accumulate the output-weight gradient over token chunks "
                                   "in fp32; False: in the weight dtype, one rounding per chunk, no fp32 "
                                   "[V_local, H] buffer")
    weight_grad_chunks: int = Field(1, ge=1, description="chunks per weight-gradient GEMM: their logit "
                                    "gradients are kept in the weight dtype until then, so a wide "
                                    "(fp32) weight-gradient buffer is updated this many times less often")

    @model_validator(mode="after")
    def _consistent(self) -> LossConfig:
        if self.divergence == "jsd" and self.beta is None:
            raise ValueError("divergence 'jsd' needs beta in [0, 1]")
        if self.divergence != "jsd" and self.beta is not None:
            raise ValueError(f"beta only applies to divergence 'jsd', not {self.divergence!r}; remove it")
        if self.top_k is not None and self.top_k > self.vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds vocab_size={self.vocab_size}")
        if self.sampled_token and (self.clip is not None or self.top_k is not None):
            raise ValueError("sampled_token uses neither clip nor top_k; set clip: null and top_k: null")
        return self

    def chunk_rows(self, device: torch.device) -> int:
        """Tokens per chunk on ``device`` (``chunk_size``, else the device's default)."""
        return self.chunk_size or (CPU_CHUNK if device.type == "cpu" else GPU_CHUNK)

    @property
    def kind(self) -> Divergence:
        """The divergence actually computed: JSD with beta 0 / 1 is forward / reverse KL."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.divergence


# --------------------------------------------------------------------------------------------
# Dense reference
# --------------------------------------------------------------------------------------------


def dense_token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig,
                           target_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss ``[N]`` from full logits ``[N, V']`` (``V' >= vocab_size``; columns beyond
    ``vocab_size`` are padding and dropped). The teacher is detached. Computes in at least fp32.
    """
    _check_targets(cfg, target_ids)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    zs = student_logits[:, : cfg.vocab_size].to(dtype) / cfg.temperature
    zt = teacher_logits[:, : cfg.vocab_size].detach().to(dtype) / cfg.temperature
    if cfg.top_k is not None:
        kth = zt.topk(cfg.top_k, dim=-1).values[:, -1:]
        drop = zt < kth
        zs, zt = zs.masked_fill(drop, -math.inf), zt.masked_fill(drop, -math.inf)
    logp, logq = torch.log_softmax(zs, dim=-1), torch.log_softmax(zt, dim=-1)
    if cfg.sampled_token:
        logp_y = logp.gather(1, target_ids[:, None]).squeeze(1)
        advantage = (logq.gather(1, target_ids[:, None]).squeeze(1) - logp_y).detach()
        return -advantage * logp_y
    p, q = logp.exp(), logq.exp()
    if cfg.top_k is not None:  # dropped entries have p = q = 0: keep 0 * log(0) terms at 0, not nan
        logp, logq = logp.masked_fill(drop, 0.0), logq.masked_fill(drop, 0.0)
    if cfg.kind == "forward_kl":
        terms = q * (logq - logp)
    elif cfg.kind == "reverse_kl":
        terms = p * (logp - logq)
    else:
        beta = cfg.beta
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log(1.0 - beta))
        terms = beta * q * (logq - logm) + (1.0 - beta) * p * (logp - logm)
    if cfg.clip is not None:
        terms = terms.clamp(max=cfg.clip)
    return terms.sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Fused, chunked, vocab-parallel
# --------------------------------------------------------------------------------------------


def fused_token_divergence(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                           student_weight: torch.Tensor, teacher_weight: torch.Tensor, cfg: LossConfig,
                           target_ids: torch.Tensor | None = None,
                           group: dist.ProcessGroup | None = None,
                           main_grad_scale: float | None = None,
                           sampled: SampledLogprobs | None = None) -> torch.Tensor:
    """Per-token loss ``[N]`` (fp32; fp64 for fp64 inputs; identical on every TP rank) from final
    hidden states, never materializing more than ``[chunk_size, V_local]`` logits.

    Args:
        student_hidden, teacher_hidden: ``[N, H]``, the same tokens in the same order, replicated
            across the TP group (gather sequence-parallel activations first).
        student_weight, teacher_weight: ``[V_local, H]`` output-layer shards; rank ``r`` of ``group``
            holds rows ``[r * V_local, (r + 1) * V_local)`` of the padded vocabulary. Rows with a
            global index ``>= cfg.vocab_size`` are padding: never used, zero gradient.
        target_ids: ``[N]`` sampled token ids, for ``cfg.sampled_token`` only.
        group: the tensor-parallel group; None means no tensor parallelism.
        main_grad_scale: opt-in for training under Megatron DDP (below); None (default) returns
            the ``student_weight`` gradient through autograd as usual.
        sampled: also the student's log-probs of ``sampled.targets`` at ``sampled.temperature``
            (into ``sampled.values``, no gradient), from the logits the loss forms anyway.

    Gradient contract:
        Gradients flow to ``student_hidden`` and ``student_weight`` only. The ``student_hidden``
        gradient is the FULL gradient: the all-reduce over ``group`` of the per-rank partials
        (what ``copy_to_tensor_model_parallel_region`` does for a ``ColumnParallelLinear``) happens
        inside, so pass the plain replicated hidden states, not a ``copy_to_...`` output; with
        sequence parallelism gather with ``tensor_parallel_output_grad=False``. The
        ``student_weight`` gradient is this rank's shard (padding rows zero), accumulated over
        token chunks in fp32 unless ``cfg.weight_grad_fp32`` is False.

    Upstream gradient:
        When autograd will need gradients, the forward pass already computes the gradient
        products ``dlogits W`` and ``dlogits^T x`` chunk by chunk (4 large matmuls in total,
        like the naive loss). Backward scales them if the upstream gradient is the same for every
        token (``loss.sum()``, a token mean, ``sum / global_token_count``); otherwise (per-token
        weights, a multiplied mask) it recomputes exactly, chunk by chunk (2 more matmuls). Pass
        only the tokens that count rather than masking: masked tokens then cost nothing.

    Weight gradient into ``main_grad`` (``main_grad_scale``):
        Under Megatron's ``DistributedDataParallel`` every parameter has a ``main_grad`` buffer
        (fp32 with ``grad_reduce_in_fp32``) that the DDP backward hook adds ``param.grad`` to. The
        default path still builds a full ``[V_local, H]`` gradient (plus an fp32 accumulator)
        for the hook to add; like Megatron's ``gradient_accumulation_fusion``, passing
        ``main_grad_scale`` instead adds each token chunk's weight gradient to
        ``student_weight.main_grad`` directly and gives autograd no weight gradient. Because it
        happens in forward (the weight product is formed there, see above), the caller promises
        the upstream gradient now: contract, checked in backward:

        - The loss is backpropagated exactly once, with an upstream gradient equal to
          ``main_grad_scale`` for every token. In the trainer: Megatron's schedule with
          ``calculate_per_token_loss`` backpropagates ``per_token_loss.sum()`` times the
          optimizer's loss scale, so ``main_grad_scale = float(optimizer.get_loss_scale())``
          (1.0 for bf16 and fp32 training). Backward raises if the upstream gradient differs
          (``student_weight.main_grad`` is then wrong: zero the grad buffers before another step).
        - Only when autograd will need gradients (grad mode on, ``student_weight`` requires grad);
          a ``torch.no_grad()`` pass leaves ``main_grad`` untouched. Do not pass it for a
          grad-enabled forward that is never backpropagated (it would still add to ``main_grad``).
        - ``weight_grad_fp32`` does not apply: accumulation is in ``main_grad``'s dtype.
        - Tied embeddings work: the weight's other uses (the input-embedding lookup) still reach
          ``param.grad`` through autograd and the DDP hook adds them once. That is why the loss
          returns None, not a dummy gradient with ``grad_added_to_main_grad = True`` (Megatron's
          linear layers), which would make the hook skip the embedding's part.
        - Megatron DDP with ``overlap_grad_reduce=True`` is not supported for an untied output
          weight: its hook asserts that ``param.grad`` is not None.
        - A retained graph's second backward recomputes and returns the weight gradient through
          autograd, as without ``main_grad_scale``.
    """
    _check_targets(cfg, target_ids)
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
    return _FusedTokenDivergence.apply(student_hidden, student_weight, teacher_hidden.detach(),
                                       teacher_weight.detach(), target_ids, cfg, group, precompute,
                                       main_grad_scale if into_main_grad else None, sampled)


@dataclass
class SampledLogprobs:
    """A request to :func:`fused_token_divergence` for ``log_softmax(student_logits / temperature)``
    at ``targets`` (global token ids ``[N]``); the loss fills ``values`` (``[N]``, fp32)."""

    targets: torch.Tensor
    temperature: float
    values: torch.Tensor | None = None


def _check_targets(cfg: LossConfig, target_ids: torch.Tensor | None) -> None:
    if cfg.sampled_token != (target_ids is not None):
        raise ValueError("target_ids are required with sampled_token and only used by it")
    if target_ids is not None and target_ids.numel() \
            and not 0 <= int(target_ids.min()) <= int(target_ids.max()) < cfg.vocab_size:
        raise ValueError(f"target_ids must lie in [0, vocab_size={cfg.vocab_size})")


class _FusedTokenDivergence(torch.autograd.Function):
    """Three backward paths: the forward's products scaled by a uniform upstream gradient; the
    products as promised by ``main_grad_scale`` (weight part already in ``main_grad``); recompute."""

    @staticmethod
    def forward(ctx, hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor,
                targets: torch.Tensor | None, cfg: LossConfig, group: dist.ProcessGroup | None,
                precompute: bool, main_grad_scale: float | None, sampled: SampledLogprobs | None) -> torch.Tensor:
        ctx.cfg, ctx.group, ctx.main_grad_scale = cfg, group, main_grad_scale
        ctx.save_for_backward(hs, ws, ht, wt, targets)
        want_h, want_w = precompute and ctx.needs_input_grad[0], precompute and ctx.needs_input_grad[1]
        if main_grad_scale is None:
            loss, grad_h, grad_w = _run_chunks(hs, ws, ht, wt, targets, cfg, group, want_h, want_w, sampled=sampled)
        else:  # products already scaled as promised; the weight's go to main_grad
            loss, grad_h, grad_w = _run_chunks(hs, ws, ht, wt, targets, cfg, group, want_h, want_w,
                                               scale=main_grad_scale, grad_w=ws.main_grad, sampled=sampled)
            grad_w = None
        ctx.products = (grad_h, grad_w) if precompute else None
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        hs, ws, ht, wt, targets = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        products, ctx.products = ctx.products, None  # used once; a second backward recomputes
        # grad_loss derives from the replicated per-token loss, so every TP rank takes the same path.
        uniform = products is not None and (grad_loss.numel() == 0 or bool((grad_loss == grad_loss[0]).all()))
        if products is not None and ctx.main_grad_scale is not None:
            promised = ctx.main_grad_scale
            if not uniform or (grad_loss.numel() and bool(grad_loss[0] != promised)):
                got = f"{float(grad_loss[0])} for every token" if uniform else "a per-token gradient"
                raise RuntimeError(
                    f"fused_token_divergence(main_grad_scale={promised}) added the output-weight gradient "
                    f"for an upstream gradient of {promised} per token to student_weight.main_grad in "
                    f"forward, but backward received {got}: main_grad is now wrong (zero the grad "
                    f"buffers). Backpropagate per_token_loss.sum() times main_grad_scale, or pass "
                    f"main_grad_scale=None")
            grad_h, grad_w = products
        elif uniform:
            scale = grad_loss[0] if grad_loss.numel() else 0.0
            grad_h, grad_w = (g.mul_(scale) if g is not None else None for g in products)
        else:
            _, grad_h, grad_w = _run_chunks(hs, ws, ht, wt, targets, ctx.cfg, ctx.group, want_h, want_w,
                                            grad_loss)
        if grad_h is not None:
            _all_reduce(grad_h, dist.ReduceOp.SUM, ctx.group)
            grad_h = grad_h.to(hs.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(ws.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _run_chunks(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor,
                targets: torch.Tensor | None, cfg: LossConfig, group: dist.ProcessGroup | None,
                want_h: bool, want_w: bool, grad_loss: torch.Tensor | None = None, scale: float = 1.0,
                grad_w: torch.Tensor | None = None, sampled: SampledLogprobs | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One pass over token chunks: the per-token loss and, as requested, the gradient products
    w.r.t. ``hs`` (this rank's partial, fp32) and ``ws``, each token's row scaled by ``scale`` and
    by ``grad_loss`` when given (recompute path; neither in the plain forward precompute). The
    ``ws`` product is added to ``grad_w`` when given (``main_grad``), else to a new accumulator
    (fp32 unless ``weight_grad_fp32`` is False). ``sampled`` is filled on the way.
    """
    n, hidden = hs.shape
    rank = 0 if group is None else dist.get_rank(group)
    start = rank * ws.shape[0]
    valid = max(0, min(ws.shape[0], cfg.vocab_size - start))  # this shard's non-padding rows
    ws_v, wt_v = ws[:valid], wt[:valid]
    acc = torch.promote_types(hs.dtype, torch.float32)
    loss = torch.empty(n, dtype=acc, device=hs.device)
    grad_h = torch.zeros(n, hidden, dtype=acc, device=hs.device) if want_h else None
    if want_w and grad_w is None:
        grad_w = torch.zeros(ws.shape, dtype=acc if cfg.weight_grad_fp32 else ws.dtype, device=ws.device)
    if sampled is not None:
        sampled.values = torch.empty(n, dtype=torch.float32, device=hs.device)
    chunk = cfg.chunk_rows(hs.device)
    block = chunk * cfg.weight_grad_chunks  # tokens per weight-gradient GEMM
    stash = torch.empty(min(block, n), valid, dtype=ws.dtype, device=ws.device) \
        if want_w and cfg.weight_grad_chunks > 1 else None
    tiled = cfg.kind == "forward_kl" and cfg.top_k is None and not cfg.sampled_token
    # The sampled tokens' log-probs: the loss's own log-softmax of zs when it is the same one
    # (same temperature, whole vocabulary), else formed from zs (in the third block) before the
    # loss consumes it.
    from_loss = sampled is not None and sampled.temperature == cfg.temperature and cfg.top_k is None \
        and not cfg.sampled_token
    third_block = not tiled or (sampled is not None and not from_loss)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        blocks = [_block(i, e - s, valid, acc, hs.device) for i in range(2)]
        blocks.append(_block(2, e - s, valid, acc, hs.device) if third_block else None)
        zs = _scaled_logits(hs[s:e], ws_v, cfg.temperature, acc, out=blocks[0])
        zt = _scaled_logits(ht[s:e], wt_v, cfg.temperature, acc, out=blocks[1])
        at = None
        if sampled is not None:
            if from_loss:
                at = sampled.targets[s:e] - start
            else:
                sampled.values[s:e] = _target_logprobs(zs, sampled.targets[s:e] - start,
                                                       cfg.temperature / sampled.temperature, group, blocks[2])
        if cfg.sampled_token:
            loss[s:e], dz = _sampled_chunk(zs, zt, targets[s:e] - start, group, out=blocks[2])
        elif tiled:
            loss[s:e], dz, logp_at = _forward_kl_chunk(zs, zt, cfg.clip, group, at=at)
            if at is not None:
                sampled.values[s:e] = logp_at
        else:
            loss[s:e], dz, logp_at = _divergence_chunk(zs, zt, cfg, group, out=blocks[2], at=at)
            if at is not None:
                sampled.values[s:e] = logp_at
        del zs, zt, blocks
        if not (want_h or want_w):
            continue
        if grad_loss is not None:
            dz.mul_(grad_loss[s:e, None].to(acc))
        if scale != 1.0:
            dz.mul_(scale)
        dz = dz.div_(cfg.temperature).to(ws.dtype)
        if want_h:
            grad_h[s:e] = dz @ ws_v
        if want_w and stash is None:
            _add_weight_grad(grad_w[:valid], dz, hs[s:e])
        elif want_w:
            first = s - s % block
            stash[s - first:e - first] = dz
            if e == n or e - first == block:
                _add_weight_grad(grad_w[:valid], stash[:e - first], hs[first:e])
    return loss, grad_h, grad_w


def _add_weight_grad(grad_w: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, rows: int = 8192) -> None:
    """``grad_w += dz^T h``. The GEMM accumulates in fp32 either way; a wider ``grad_w`` takes the
    product ``rows`` rows at a time so it never needs a ``[V_local, H]`` temporary."""
    if grad_w.dtype == dz.dtype:
        grad_w.addmm_(dz.T, h)
        return
    for r in range(0, grad_w.shape[0], rows):
        grad_w[r:r + rows] += dz[:, r:r + rows].T @ h


_BLOCKS: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _block(index: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Scratch block ``index`` as ``[rows, cols]``, on CPU only: kept from one chunk and call to the
    next, because a fresh logits-sized tensor costs more in page faults there than the pass that fills
    it (CUDA's caching allocator reuses memory already; None there: allocate as usual)."""
    if device.type != "cpu":
        return None
    block = _BLOCKS.get((index, dtype))
    if block is None or block.numel() < rows * cols:
        block = _BLOCKS[(index, dtype)] = torch.empty(rows * cols, dtype=dtype)
    return block[:rows * cols].view(rows, cols)


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, temperature: float, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``(h W^T) / T`` in ``dtype`` (the matmul runs in the input dtype), in ``out`` when given and
    the input is already ``dtype``, else a fresh tensor."""
    if out is None or h.dtype != dtype:
        return (h @ w.T).to(dtype).div_(temperature)
    return torch.matmul(h, w.T, out=out).div_(temperature)


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


def _row_max(z: torch.Tensor) -> torch.Tensor:
    """Max over the last dim; -inf for a shard with no columns (all padding)."""
    if z.shape[-1] == 0:
        return z.new_full(z.shape[:-1], -math.inf)
    return z.amax(dim=-1)


def _log_softmax_pair(zs: torch.Tensor, zt: torch.Tensor, group: dist.ProcessGroup | None,
                      local_index: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      softmax: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Turn ``zs``, ``zt`` into vocab-parallel log-softmax in place (two all-reduces of ``[2, c]``)
    and, with ``softmax``, return the softmax of ``zt`` (in ``out`` when given: the exponentials its
    normalizer is summed from, divided by it); None without. Without it ``out`` may have fewer rows:
    a tile the exponentials are summed through a few rows at a time.

    With ``local_index`` (``[c]`` column in this shard, or out of range when another rank holds
    it) also returns the two log-probabilities at that column, ``[2, c]``, globally.
    """
    peak = torch.stack([_row_max(zs), _row_max(zt)])
    _all_reduce(peak, dist.ReduceOp.MAX, group)
    zs.sub_(peak[0, :, None])
    zt.sub_(peak[1, :, None])
    exp = out if out is not None else torch.empty_like(zt)
    sums, step = zs.new_empty(2, len(zs)), max(len(exp), 1)
    for r in range(0, len(zs), step):
        tile = exp[:min(step, len(zs) - r)]
        sums[0, r:r + step] = torch.exp(zs[r:r + step], out=tile).sum(dim=-1)
        sums[1, r:r + step] = torch.exp(zt[r:r + step], out=tile).sum(dim=-1)
    stats = list(sums)
    if local_index is not None:
        here = (local_index >= 0) & (local_index < zs.shape[1])
        col = local_index.clamp(0, max(zs.shape[1] - 1, 0))[:, None]
        for z in (zs, zt):
            stats.append(z.gather(1, col).squeeze(1).masked_fill(~here, 0.0) if zs.shape[1] else
                         torch.zeros_like(stats[0]))
    stats = torch.stack(stats)
    _all_reduce(stats, dist.ReduceOp.SUM, group)
    log_norm = stats[:2].log()
    zs.sub_(log_norm[0, :, None])
    zt.sub_(log_norm[1, :, None])
    return exp.div_(stats[1, :, None]) if softmax else None, (stats[2:] - log_norm if local_index is not None else None)


def _divergence_chunk(zs: torch.Tensor, zt: torch.Tensor, cfg: LossConfig, group: dist.ProcessGroup | None,
                      out: torch.Tensor | None = None, at: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token loss ``[c]``, ``dL/dz_S`` ``[c, V_local_valid]`` and (with ``at``: one local
    column per row, out of range when another rank holds it; not with top-k) the student's
    log-prob there, for one chunk (consumes the inputs; ``out``: a block of their shape to work in).
    Top-k works on the gathered kept entries and scatters the gradient back."""
    full = zs.shape
    if cfg.top_k is not None:
        zt, index = zt.topk(min(cfg.top_k, zt.shape[1]), dim=-1, sorted=False)
        zs = zs.gather(1, index)
        drop = zt < _global_kth(zt, cfg.top_k, group)[:, None]
        zs.masked_fill_(drop, -math.inf)
        zt.masked_fill_(drop, -math.inf)
        out = None  # the kept entries only
    q, logp_at = _log_softmax_pair(zs, zt, group, at, out=out)
    logp, logq = zs, zt
    if cfg.kind == "forward_kl":
        terms = logq.sub_(logp).mul_(q)
        p, h = logp.exp_(), q.neg_()
    elif cfg.kind == "reverse_kl":
        diff = torch.sub(logp, logq, out=logq)
        p = logp.exp_()
        terms = torch.mul(p, diff, out=q)
        h = diff.add_(1.0).mul_(p)
    else:
        beta = cfg.beta
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log(1.0 - beta))
        p = logp.exp()
        h = logp.sub_(logm).mul_(p).mul_(1.0 - beta)
        terms = logq.sub_(logm).mul_(q).mul_(beta).add_(h)
        del logm, q
    if cfg.top_k is not None:  # dropped entries: p = q = 0, terms are nan (0 * inf)
        terms.masked_fill_(drop, 0.0)
        h.masked_fill_(drop, 0.0)
    if cfg.clip is not None:
        h.masked_fill_(terms > cfg.clip, 0.0)
        terms.clamp_(max=cfg.clip)
    sums = torch.stack([terms.sum(dim=-1), h.sum(dim=-1)])
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    dz = h.sub_(p.mul_(sums[1, :, None]))
    if cfg.top_k is not None:
        dz = dz.new_zeros(full).scatter_(1, index, dz)
    return sums[0], dz, (logp_at[0] if logp_at is not None else None)


def _forward_kl_chunk(zs: torch.Tensor, zt: torch.Tensor, clip: float | None, group: dist.ProcessGroup | None,
                      at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_divergence_chunk` for forward KL over the whole vocabulary in the two input blocks
    (``dL/dz_S`` is returned in ``zt``'s): the per-entry work runs a few rows at a time through a
    scratch tile (on CPU) instead of a third block. Three all-reduces, as there."""
    rows = _tile_rows(zs)
    scratch = _tile(zs[:rows])
    _, logp_at = _log_softmax_pair(zs, zt, group, at, out=scratch, softmax=False)  # zs, zt: log p, log q
    sums = zs.new_empty(2, zs.shape[0])  # per token: loss, sum of h
    for r in range(0, zs.shape[0], rows):
        logp, logq = zs[r:r + rows], zt[r:r + rows]
        q = torch.exp(logq, out=scratch[:len(logq)])
        terms = logq.sub_(logp).mul_(q)  # l_v = q (log q - log p), in zt's block
        if clip is not None:
            q.masked_fill_(terms > clip, 0.0)  # h = -a q
            terms.clamp_(max=clip)
        sums[0, r:r + rows] = terms.sum(dim=-1)
        sums[1, r:r + rows] = q.sum(dim=-1).neg_()
        torch.neg(q, out=logq)  # zt's block now holds h
        logp.exp_()  # p
    _all_reduce(sums, dist.ReduceOp.SUM, group)
    for r in range(0, zs.shape[0], rows):
        zt[r:r + rows].sub_(zs[r:r + rows].mul_(sums[1, r:r + rows, None]))  # dL/dz_S = h - p * sum(h)
    return sums[0], zt, (logp_at[0] if logp_at is not None else None)


def _tile_rows(z: torch.Tensor) -> int:
    """Rows per scratch tile: about 1M entries (4 MB in fp32) on CPU, so that a tile's passes hit
    cache; the whole block elsewhere (a GPU wants few, large kernels)."""
    if z.device.type != "cpu":
        return max(z.shape[0], 1)
    return max(1, (1 << 20) // max(z.shape[1], 1))


def _tile(like: torch.Tensor) -> torch.Tensor:
    """The chunk's one scratch tile, shaped like ``like`` (rows of a block): block 3 on CPU, a fresh
    tensor elsewhere."""
    tile = _block(3, like.shape[0], like.shape[1], like.dtype, like.device)
    return tile if tile is not None else torch.empty_like(like)


def _target_logprobs(z: torch.Tensor, local_target: torch.Tensor, rescale: float, group: dist.ProcessGroup | None,
                     out: torch.Tensor | None) -> torch.Tensor:
    """``log_softmax(z * rescale)`` at each row's column ``local_target`` (out of range: another
    rank's), vocab-parallel (two all-reduces of ``[c]`` / ``[2, c]``); ``z`` is left as it is,
    ``out`` (a block of its shape) is worked in."""
    peak = _row_max(z).mul_(rescale)
    _all_reduce(peak, dist.ReduceOp.MAX, group)
    shifted = torch.mul(z, rescale, out=out) if out is not None else z * rescale
    shifted.sub_(peak[:, None])
    here = (local_target >= 0) & (local_target < z.shape[1])
    at = shifted.gather(1, local_target.clamp(0, max(z.shape[1] - 1, 0))[:, None]).squeeze(1).masked_fill(~here, 0.0) \
        if z.shape[1] else torch.zeros_like(peak)
    stats = torch.stack([shifted.exp_().sum(dim=-1), at])
    _all_reduce(stats, dist.ReduceOp.SUM, group)
    return (stats[1] - stats[0].log()).float()


def _global_kth(values: torch.Tensor, k: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """k-th largest per row over all ranks, from each rank's local top values ``[c, <=k]``."""
    if group is not None and dist.get_world_size(group) > 1:
        padded = values.new_full((values.shape[0], k), -math.inf)
        padded[:, : values.shape[1]] = values
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, padded, group=group)
        values = torch.cat(parts, dim=1)
    return values.topk(k, dim=-1, sorted=True).values[:, -1]


def _sampled_chunk(zs: torch.Tensor, zt: torch.Tensor, local_target: torch.Tensor, group: dist.ProcessGroup | None,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token loss ``-A log p_y`` and ``dL/dz_S = A (p - onehot(y))`` for one chunk."""
    _, (logp_y, logq_y) = _log_softmax_pair(zs, zt, group, local_target, out=out, softmax=False)
    advantage = logq_y - logp_y
    dz = zs.exp_().mul_(advantage[:, None])
    if dz.shape[1]:
        here = (local_target >= 0) & (local_target < dz.shape[1])
        dz.scatter_add_(1, local_target.clamp(0, dz.shape[1] - 1)[:, None], -(advantage * here)[:, None])
    return -advantage * logp_y, dz
