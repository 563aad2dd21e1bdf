"""The fused OPSD loss's pass over token chunks (``loss.py``'s autograd function runs it).

Per chunk of ``LossConfig.chunk_rows`` tokens: the student's and the teacher's logits from their
hidden states and this rank's output-layer shard (the matmuls in the input dtype, then fp32; fp64
stays fp64), their vocab-parallel log-softmax (``models.vocab_parallel``), the chunk's per-token
loss and ``dL/dz_S`` (``divergence.py`` has the math), and, as the pass asks, the gradient
products ``dlogits W`` (hidden) and ``dlogits^T x`` (weight shard).

Memory: one chunk holds two ``[chunk, V_local]`` blocks for forward KL over the whole vocabulary
(its per-entry work runs a few rows at a time through a cache-sized tile), three otherwise (plus,
with ``weight_grad_chunks`` ``k > 1``, the logit gradients of ``k`` chunks in the input dtype).
Gradients add an fp32 ``[N, H]`` hidden-gradient buffer and a ``[V_local, H]`` weight-gradient
accumulator, unless the weight's go straight into DDP's ``main_grad``. On CPU the blocks are kept
from one chunk and call to the next by the caller's :class:`Scratch`: a fresh logits-sized tensor
costs more in page faults there than the pass that fills it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_opsd.algorithms.opsd.divergence import LossConfig
from megatron_opsd.models.vocab_parallel import all_reduce, global_kth, local_column, log_softmax_pair_, target_logprobs


@dataclass
class SampledLogprobs:
    """A request to the fused loss for ``log_softmax(student_logits / temperature)`` at ``targets``
    (global token ids ``[N]``): the loss fills ``values`` (``[N]``, fp32) from the logits it forms."""

    targets: Tensor
    temperature: float
    values: Tensor | None = None


class Scratch:
    """The logits-sized blocks of a loss, kept while their owner lives: on CPU one per index, grown
    to the largest chunk seen (the owner, e.g. the OPSD algorithm, frees them with itself); on a
    GPU fresh tensors, since the caching allocator already reuses memory."""

    TILE = 3  # the index of the forward-KL pass's tile

    def __init__(self) -> None:
        self._blocks: dict[tuple[int, torch.dtype], Tensor] = {}

    def block(self, index: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """Block ``index`` as ``[rows, cols]`` on CPU; None elsewhere (allocate as usual)."""
        if device.type != "cpu":
            return None
        block = self._blocks.get((index, dtype))
        if block is None or block.numel() < rows * cols:
            block = self._blocks[(index, dtype)] = torch.empty(rows * cols, dtype=dtype)
        return block[:rows * cols].view(rows, cols)

    def tile(self, like: Tensor) -> Tensor:
        """The chunk's tile, shaped like ``like`` (rows of a block)."""
        tile = self.block(self.TILE, like.shape[0], like.shape[1], like.dtype, like.device)
        return tile if tile is not None else torch.empty_like(like)


@dataclass(frozen=True)
class Operands:
    """What one call of the loss works on: the student's and the teacher's ``[N, H]`` hidden states
    and ``[V_local, H]`` output-layer shards, the sampled tokens (``sampled_token`` only), the
    config and the tensor-parallel group."""

    hs: Tensor
    ws: Tensor
    ht: Tensor
    wt: Tensor
    targets: Tensor | None
    cfg: LossConfig
    group: dist.ProcessGroup | None


@dataclass
class Pass:
    """What one pass over the chunks forms besides the per-token loss: the gradient products with
    respect to the hidden states (this rank's partial, fp32) and the weight shard, each token's row
    times ``scale`` and the per-token ``upstream`` gradient (the recompute path), the weight's added
    to ``weight_into`` (``main_grad``) when given; ``sampled`` is filled on the way."""

    hidden_grad: bool = False
    weight_grad: bool = False
    weight_into: Tensor | None = None
    upstream: Tensor | None = None
    scale: float = 1.0
    sampled: SampledLogprobs | None = None


def run_chunks(ops: Operands, asked: Pass, scratch: Scratch) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(per-token loss ``[N]``, hidden gradient product or None, weight gradient product or None)."""
    hs, ws, ht, wt, targets, cfg, group = ops.hs, ops.ws, ops.ht, ops.wt, ops.targets, ops.cfg, ops.group
    sampled = asked.sampled
    n, hidden = hs.shape
    rank = 0 if group is None else dist.get_rank(group)
    start = rank * ws.shape[0]
    valid = max(0, min(ws.shape[0], cfg.vocab_size - start))  # this shard's non-padding rows
    ws_v, wt_v = ws[:valid], wt[:valid]
    acc = torch.promote_types(hs.dtype, torch.float32)
    loss = torch.empty(n, dtype=acc, device=hs.device)
    grad_h = torch.zeros(n, hidden, dtype=acc, device=hs.device) if asked.hidden_grad else None
    grad_w = asked.weight_into
    if asked.weight_grad and grad_w is None:
        grad_w = torch.zeros(ws.shape, dtype=acc if cfg.weight_grad_fp32 else ws.dtype, device=ws.device)
    if sampled is not None:
        sampled.values = torch.empty(n, dtype=torch.float32, device=hs.device)
    chunk = cfg.chunk_rows(hs.device)
    block = chunk * cfg.weight_grad_chunks  # tokens per weight-gradient GEMM
    stash = torch.empty(min(block, n), valid, dtype=ws.dtype, device=ws.device) \
        if asked.weight_grad and cfg.weight_grad_chunks > 1 else None
    tiled = cfg.kind == "forward_kl" and cfg.top_k is None and not cfg.sampled_token
    # The sampled tokens' log-probs: the loss's own log-softmax of zs when it is the same one
    # (same temperature, whole vocabulary), else formed from zs (in the third block) before the
    # loss consumes it.
    from_loss = sampled is not None and sampled.temperature == cfg.temperature and cfg.top_k is None \
        and not cfg.sampled_token
    third_block = not tiled or (sampled is not None and not from_loss)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        blocks = [scratch.block(i, e - s, valid, acc, hs.device) for i in range(2)]
        blocks.append(scratch.block(2, e - s, valid, acc, hs.device) if third_block else None)
        zs = _scaled_logits(hs[s:e], ws_v, cfg.temperature, acc, out=blocks[0])
        zt = _scaled_logits(ht[s:e], wt_v, cfg.temperature, acc, out=blocks[1])
        at = None
        if sampled is not None:
            if from_loss:
                at = sampled.targets[s:e] - start
            else:
                sampled.values[s:e] = target_logprobs(zs, sampled.targets[s:e] - start,
                                                      cfg.temperature / sampled.temperature, group, blocks[2])
        if cfg.sampled_token:
            loss[s:e], dz = _sampled_chunk(zs, zt, targets[s:e] - start, group, out=blocks[2])
        elif tiled:
            loss[s:e], dz, logp_at = _forward_kl_chunk(zs, zt, cfg.clip, group, scratch, at=at)
            if at is not None:
                sampled.values[s:e] = logp_at
        else:
            loss[s:e], dz, logp_at = _divergence_chunk(zs, zt, cfg, group, out=blocks[2], at=at)
            if at is not None:
                sampled.values[s:e] = logp_at
        del zs, zt, blocks
        if not (asked.hidden_grad or asked.weight_grad):
            continue
        if asked.upstream is not None:
            dz.mul_(asked.upstream[s:e, None].to(acc))
        if asked.scale != 1.0:
            dz.mul_(asked.scale)
        dz = dz.div_(cfg.temperature).to(ws.dtype)
        if asked.hidden_grad:
            grad_h[s:e] = dz @ ws_v
        if asked.weight_grad and stash is None:
            _add_weight_grad(grad_w[:valid], dz, hs[s:e])
        elif asked.weight_grad:
            first = s - s % block
            stash[s - first:e - first] = dz
            if e == n or e - first == block:
                _add_weight_grad(grad_w[:valid], stash[:e - first], hs[first:e])
    return loss, grad_h, grad_w


def _add_weight_grad(grad_w: Tensor, dz: Tensor, h: Tensor, rows: int = 8192) -> None:
    """``grad_w += dz^T h``. The GEMM accumulates in fp32 either way; a wider ``grad_w`` takes the
    product ``rows`` rows at a time so it never needs a ``[V_local, H]`` temporary."""
    if grad_w.dtype == dz.dtype:
        grad_w.addmm_(dz.T, h)
        return
    for r in range(0, grad_w.shape[0], rows):
        grad_w[r:r + rows] += dz[:, r:r + rows].T @ h


def _scaled_logits(h: Tensor, w: Tensor, temperature: float, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``(h W^T) / T`` in ``dtype`` (the matmul runs in the input dtype), in ``out`` when given and
    the input is already ``dtype``, else a fresh tensor."""
    if out is None or h.dtype != dtype:
        return (h @ w.T).to(dtype).div_(temperature)
    return torch.matmul(h, w.T, out=out).div_(temperature)


def _divergence_chunk(zs: Tensor, zt: Tensor, cfg: LossConfig, group: dist.ProcessGroup | None,
                      out: Tensor | None = None, at: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token loss ``[c]``, ``dL/dz_S`` ``[c, V_local_valid]`` and (with ``at``: one local
    column per row, out of range when another rank holds it; not with top-k) the student's
    log-prob there, for one chunk (consumes the inputs; ``out``: a block of their shape to work in).
    Top-k works on the gathered kept entries and scatters the gradient back."""
    full = zs.shape
    if cfg.top_k is not None:
        zt, index = zt.topk(min(cfg.top_k, zt.shape[1]), dim=-1, sorted=False)
        zs = zs.gather(1, index)
        drop = zt < global_kth(zt, cfg.top_k, group)[:, None]
        zs.masked_fill_(drop, -math.inf)
        zt.masked_fill_(drop, -math.inf)
        out = None  # the kept entries only
    exps = out if out is not None else torch.empty_like(zt)
    normalized = log_softmax_pair_(zs, zt, group, exps, at)
    q = exps.div_(normalized.sums[1, :, None])  # the teacher's softmax
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
    all_reduce(sums, dist.ReduceOp.SUM, group)
    dz = h.sub_(p.mul_(sums[1, :, None]))
    if cfg.top_k is not None:
        dz = dz.new_zeros(full).scatter_(1, index, dz)
    return sums[0], dz, (normalized.at[0] if at is not None else None)


def _forward_kl_chunk(zs: Tensor, zt: Tensor, clip: float | None, group: dist.ProcessGroup | None, scratch: Scratch,
                      at: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`_divergence_chunk` for forward KL over the whole vocabulary in the two input blocks
    (``dL/dz_S`` is returned in ``zt``'s): the per-entry work runs a few rows at a time through a
    scratch tile (on CPU) instead of a third block. Three all-reduces, as there."""
    rows = _tile_rows(zs)
    tile = scratch.tile(zs[:rows])
    normalized = log_softmax_pair_(zs, zt, group, tile, at)  # zs, zt: log p, log q
    sums = zs.new_empty(2, zs.shape[0])  # per token: loss, sum of h
    for r in range(0, zs.shape[0], rows):
        logp, logq = zs[r:r + rows], zt[r:r + rows]
        q = torch.exp(logq, out=tile[:len(logq)])
        terms = logq.sub_(logp).mul_(q)  # l_v = q (log q - log p), in zt's block
        if clip is not None:
            q.masked_fill_(terms > clip, 0.0)  # h = -a q
            terms.clamp_(max=clip)
        sums[0, r:r + rows] = terms.sum(dim=-1)
        sums[1, r:r + rows] = q.sum(dim=-1).neg_()
        torch.neg(q, out=logq)  # zt's block now holds h
        logp.exp_()  # p
    all_reduce(sums, dist.ReduceOp.SUM, group)
    for r in range(0, zs.shape[0], rows):
        zt[r:r + rows].sub_(zs[r:r + rows].mul_(sums[1, r:r + rows, None]))  # dL/dz_S = h - p * sum(h)
    return sums[0], zt, (normalized.at[0] if at is not None else None)


def _tile_rows(z: Tensor) -> int:
    """Rows per scratch tile: about 1M entries (4 MB in fp32) on CPU, so that a tile's passes hit
    cache; the whole block elsewhere (a GPU wants few, large kernels)."""
    if z.device.type != "cpu":
        return max(z.shape[0], 1)
    return max(1, (1 << 20) // max(z.shape[1], 1))


def _sampled_chunk(zs: Tensor, zt: Tensor, local_target: Tensor, group: dist.ProcessGroup | None,
                   out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sampled-token loss ``-A log p_y`` and ``dL/dz_S = A (p - onehot(y))`` for one chunk (``out``:
    a block of the inputs' shape to work in)."""
    exps = out if out is not None else torch.empty_like(zt)
    normalized = log_softmax_pair_(zs, zt, group, exps, local_target)
    logp_y, logq_y = normalized.at
    advantage = logq_y - logp_y
    dz = zs.exp_().mul_(advantage[:, None])
    if dz.shape[1]:
        here, col = local_column(local_target, dz.shape[1])
        dz.scatter_add_(1, col[:, None], -(advantage * here)[:, None])
    return -advantage * logp_y, dz
