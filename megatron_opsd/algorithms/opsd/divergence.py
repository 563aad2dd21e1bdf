"""The OPSD objective: the per-token divergence between the teacher's and the student's next-token
distributions, its config, and :func:`dense_token_divergence`, the readable reference on full
logits that defines its semantics (tests run it in float64 against the fused loss, ``loss.py``).

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
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

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
    chunk_size: int | None = Field(None, ge=1, description="tokens whose logits the loss forms at a time (its "
                                   "memory grows with chunk_size x vocabulary shard); None: 128 on CPU, 2048 on a GPU")
    weight_grad_fp32: bool = Field(True, description="sum the output layer's gradient over the loss's chunks in "
                                   "fp32; False: in the weight dtype (rounded once per chunk, no fp32 copy of the "
                                   "output-layer shard)")
    weight_grad_chunks: int = Field(1, ge=1, description="chunks whose output-layer gradient is formed together "
                                    "(fewer, larger updates of an fp32 gradient; the chunks' logit gradients are "
                                    "held meanwhile)")

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


def dense_token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig,
                           target_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss ``[N]`` from full logits ``[N, V']`` (``V' >= vocab_size``; columns beyond
    ``vocab_size`` are padding and dropped). The teacher is detached. Computes in at least fp32.
    """
    check_targets(cfg, target_ids)
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


def check_targets(cfg: LossConfig, target_ids: torch.Tensor | None) -> None:
    if cfg.sampled_token != (target_ids is not None):
        raise ValueError("target_ids are required with sampled_token and only used by it")
    if target_ids is not None and target_ids.numel() \
            and not 0 <= int(target_ids.min()) <= int(target_ids.max()) < cfg.vocab_size:
        raise ValueError(f"target_ids must lie in [0, vocab_size={cfg.vocab_size})")
