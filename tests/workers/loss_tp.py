"""Fused OPSD loss vs the dense float64 reference at TP=2 (gloo), plus the shared case builders
that tests/test_loss.py uses in-process at TP=1.

Every rank builds the same full-vocabulary case from one seed, keeps its shard of the padded
output layer and compares per-token losses, the full hidden gradient and its weight-shard gradient.
The ``main_grad`` checks run the loss on a parameter of a real Megatron DistributedDataParallel
module, with an untied output weight and with one tied to a VocabParallelEmbedding.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.transformer import TransformerConfig

from megatron_opsd.algorithms.opsd.divergence import LossConfig, dense_token_divergence
from megatron_opsd.algorithms.opsd.loss import SampledLogprobs, fused_token_divergence
from megatron_opsd.parallel import Layout, ParallelGroups, initialize

VARIANTS: dict[str, dict] = {
    f"{div}-clip{'on' if clip else 'off'}-top{'k' if topk else 'all'}": {
        "divergence": div, "beta": 0.3 if div == "jsd" else None, "clip": clip, "top_k": topk}
    for div in ("forward_kl", "reverse_kl", "jsd") for clip in (None, 0.02) for topk in (None, True)
}
VARIANTS["sampled_token"] = {"sampled_token": True, "clip": None}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
GROUPS = ParallelGroups.local()  # the launch's TP=2 groups once set up (tests/test_loss.py: TP=1, no groups)


@dataclasses.dataclass
class Case:
    cfg: LossConfig
    student_hidden: torch.Tensor  # [N, H]
    teacher_hidden: torch.Tensor  # [N, H]
    student_weight: torch.Tensor  # [tp * V_local, H], rows >= vocab_size are padding
    teacher_weight: torch.Tensor
    target_ids: torch.Tensor | None
    upstream: torch.Tensor  # [N] d(total)/d(per-token loss)


def make_case(variant: str, seed: int, tp: int = 1, uniform: bool = True, vocab: int | None = None,
              v_local: int | None = None) -> Case:
    """Random float64 case: N not divisible by chunk_size, vocab not divisible by tp, by default
    0-2 padding rows beyond ceil(vocab / tp) per shard; a non-uniform upstream gradient has zeros
    (masked tokens)."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    chunk = randint(2, 6)
    n = chunk * randint(1, 4) + randint(1, chunk - 1)
    hidden = randint(3, 12)
    vocab = vocab or randint(6, 40) * tp + (1 if tp > 1 else 0)
    v_local = v_local or math.ceil(vocab / tp) + randint(0, 2)
    spec = dict(VARIANTS[variant])
    if spec.get("top_k"):
        spec["top_k"] = randint(2, vocab - 1)
    cfg = LossConfig(vocab_size=vocab, chunk_size=chunk, temperature=0.5 + 1.5 * float(torch.rand(1, generator=g)),
                     **spec)
    hs = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    ws = torch.randn(tp * v_local, hidden, generator=g, dtype=torch.float64) * 2 / math.sqrt(hidden)
    ht = hs + 0.7 * torch.randn(n, hidden, generator=g, dtype=torch.float64)
    wt = ws + 0.7 * torch.randn(tp * v_local, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    targets = torch.randint(0, vocab, (n,), generator=g) if cfg.sampled_token else None
    if uniform:
        upstream = torch.full((n,), 1.0 / n, dtype=torch.float64)
    else:
        upstream = torch.rand(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) > 0.3)
        upstream[0] = 1.0
    cfg = cfg.model_copy(update={"weight_grad_chunks": randint(1, 3)})
    return Case(cfg, hs, ht, ws, wt, targets, upstream)


def dense_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss, d total / d hidden [N, H] and d total / d weight [tp * V_local, H], float64."""
    hs = case.student_hidden.clone().requires_grad_()
    ws = case.student_weight.clone().requires_grad_()
    loss = dense_token_divergence(hs @ ws.T, case.teacher_hidden @ case.teacher_weight.T, case.cfg, case.target_ids)
    (loss * case.upstream).sum().backward()
    return loss.detach(), hs.grad, ws.grad


def fused(case: Case, dtype: torch.dtype, group: dist.ProcessGroup | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token loss, hidden grad, this rank's weight-shard grad, and the shard's row offset."""
    tp, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    rows = case.student_weight.shape[0] // tp
    shard = slice(rank * rows, (rank + 1) * rows)
    hs = case.student_hidden.to(dtype, copy=True).requires_grad_()
    ws = case.student_weight[shard].to(dtype, copy=True).requires_grad_()
    loss = fused_token_divergence(hs, case.teacher_hidden.to(dtype), ws, case.teacher_weight[shard].to(dtype),
                                  case.cfg, case.target_ids, group)
    (loss * case.upstream.to(loss.dtype)).sum().backward()
    return loss.detach(), hs.grad, ws.grad, torch.tensor(rank * rows)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (exact zero expected: absolute error)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return ((actual.double() - expected).abs().max().item() if actual.numel() else 0.0) / (scale or 1.0)


def assert_matches_dense(case: Case, dtype: torch.dtype, group: dist.ProcessGroup | None = None) -> None:
    loss, grad_h, grad_w, start = fused(case, dtype, group)
    ref_loss, ref_h, ref_w = dense_reference(case)
    ref_w = ref_w[int(start): int(start) + grad_w.shape[0]]
    tol = TOLERANCE[dtype]
    for name, actual, expected in (("loss", loss, ref_loss), ("grad hidden", grad_h, ref_h),
                                   ("grad weight", grad_w, ref_w)):
        err = relative_error(actual, expected)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e} ({case.cfg})"
    assert ref_h.abs().max() > 0, "degenerate case: zero gradient"


def assert_sampled_logprobs_match_dense(seed: int, group: dist.ProcessGroup | None = None) -> None:
    """The student's log-probs of sampled tokens that the fused loss fills in (``sampled``) equal
    the dense float64 ``log_softmax(logits / T)`` at them, at the loss's temperature and at others."""
    tp, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    for variant, temperature in (("forward_kl-clipoff-topall", None), ("reverse_kl-clipon-topk", 0.7),
                                 ("sampled_token", 1.3)):
        case = make_case(variant, seed, tp=tp)
        vocab, rows = case.cfg.vocab_size, case.student_weight.shape[0] // tp
        temperature = temperature or case.cfg.temperature
        targets = torch.randint(0, vocab, (case.student_hidden.shape[0],), generator=torch.Generator().manual_seed(seed))
        logits = (case.student_hidden @ case.student_weight.T)[:, :vocab] / temperature
        want = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        shard = slice(rank * rows, (rank + 1) * rows)
        sampled = SampledLogprobs(targets, temperature)
        fused_token_divergence(case.student_hidden.float(), case.teacher_hidden.float(),
                               case.student_weight[shard].float(), case.teacher_weight[shard].float(), case.cfg,
                               case.target_ids, group, sampled=sampled)
        err = relative_error(sampled.values, want)
        assert err <= TOLERANCE[torch.float32], f"{variant} at T {temperature}: relative error {err:.2e}"


def _lockstep(cases: list[tuple[Case, torch.dtype]]) -> None:
    """Run every comparison before raising, so that all ranks issue the same collectives."""
    failures = []
    for case, dtype in cases:
        try:
            assert_matches_dense(case, dtype, dist.group.WORLD)
        except AssertionError as err:
            failures.append(str(err))
    assert not failures, "\n".join(failures)


def _check_all_variants() -> None:
    _lockstep([(make_case(variant, seed=100 + i, tp=dist.get_world_size(), uniform=uniform), dtype)
               for i, variant in enumerate(VARIANTS) for uniform in (True, False)
               for dtype in (torch.float64, torch.float32)])


def _check_all_padding_shard() -> None:
    """vocab 5 over 2 shards of 6 rows: rank 1 holds only padding; top-k crosses ranks too."""
    _lockstep([(make_case(variant, seed=7, tp=2, uniform=False, vocab=5, v_local=6), torch.float64)
               for variant in ("forward_kl-clipon-topall", "reverse_kl-clipoff-topk", "jsd-clipon-topk",
                               "sampled_token")])


class _TinyModel(torch.nn.Module):
    """Hidden states for the loss and the output-weight shard it uses: ``base`` itself (untied
    output layer) or ``base + embedding(ids)`` with the output layer tied to that embedding."""

    def __init__(self, weight_shard: torch.Tensor, tied: bool, config: TransformerConfig):
        super().__init__()
        if tied:
            tp = GROUPS.tp_size
            self.embedding = VocabParallelEmbedding(tp * weight_shard.shape[0], weight_shard.shape[1],
                                                    init_method=torch.nn.init.zeros_, config=config)
            with torch.no_grad():
                self.embedding.weight.copy_(weight_shard)
        else:
            self.weight = torch.nn.Parameter(weight_shard.clone())

    def output_weight(self) -> torch.Tensor:
        return self.embedding.weight if hasattr(self, "embedding") else self.weight

    def forward(self, base: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return base + self.embedding(ids) if hasattr(self, "embedding") else base


def _check_main_grad_ddp() -> None:
    """Two micro-batches under Megatron DDP (fp32 grad buffer) with ``main_grad_scale``: each
    weight shard's ``main_grad`` equals the dense float64 gradient of the summed loss, including
    the tied embedding's lookup gradient, which the DDP hook must add exactly once."""
    tp, rank = dist.get_world_size(), dist.get_rank()
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=tp, tensor_model_parallel_size=tp,
                               use_cpu_initialization=True, params_dtype=torch.float32)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    failures = []
    for tied in (False, True):
        case = make_case("forward_kl-clipon-topall", seed=200 + int(tied), tp=tp, vocab=19, v_local=11)
        n = case.student_hidden.shape[0]
        micro_batches = (slice(0, n // 2), slice(n // 2, n))
        ids = torch.randint(0, case.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(int(tied)))
        rows = case.student_weight.shape[0] // tp
        shard = slice(rank * rows, (rank + 1) * rows)
        module = _TinyModel(case.student_weight[shard].float(), tied, config)
        model = DistributedDataParallel(config, ddp_config, module)
        weight = module.output_weight()
        model.zero_grad_buffer()
        for mb in micro_batches:
            loss = fused_token_divergence(model(case.student_hidden[mb].float(), ids[mb]),
                                          case.teacher_hidden[mb].float(), weight, case.teacher_weight[shard].float(),
                                          case.cfg, group=GROUPS.tp,
                                          main_grad_scale=1.0)
            loss.sum().backward()
        full = case.student_weight.clone().requires_grad_()
        hidden = case.student_hidden + full[ids] if tied else case.student_hidden
        dense_token_divergence(hidden @ full.T, case.teacher_hidden @ case.teacher_weight.T, case.cfg).sum().backward()
        err = relative_error(weight.main_grad, full.grad[shard])
        if err > TOLERANCE[torch.float32]:
            failures.append(f"tied={tied}: main_grad relative error {err:.2e}")
    assert not failures, "\n".join(failures)


def _check_grpo_policy_loss() -> None:
    """GRPO's clipped policy-gradient loss on a vocab-parallel output layer equals the dense float64
    one: per-token losses, the hidden gradient and each rank's weight-shard gradient."""
    from megatron_opsd.algorithms.grpo import GRPOConfig, policy_loss

    tp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(11)
    n, h, vocab, rows = 17, 8, 27, 16
    hidden, weight = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(tp * rows, h, generator=g,
                                                                                       dtype=torch.float64)
    weight[vocab:] = 0
    targets = torch.randint(0, vocab, (n,), generator=g)
    advantage, token_weight = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g) + 0.5
    logp_ref = torch.log_softmax((hidden @ weight.T)[:, :vocab] / 0.9, -1).gather(1, targets[:, None])[:, 0]
    old = logp_ref + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    cfg = GRPOConfig(clip_eps=0.1, chunk_size=4)
    shard = weight[rank * rows:(rank + 1) * rows].float().requires_grad_()
    ours_h = hidden.float().requires_grad_()
    per_token, _, _ = policy_loss(ours_h, shard, targets, advantage.float(), token_weight.float(), old.float(), cfg,
                                  vocab_size=vocab, temperature=0.9, groups=GROUPS)
    per_token.sum().backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = torch.log_softmax((ref_h @ ref_w.T)[:, :vocab] / 0.9, -1).gather(1, targets[:, None])[:, 0]
    ratio = torch.exp(logp - old)
    ref = -torch.minimum(ratio * advantage, ratio.clamp(0.9, 1.1) * advantage) * token_weight
    ref.sum().backward()
    for what, got, want in (("per-token loss", per_token.detach(), ref.detach()),
                            ("hidden grad", ours_h.grad, ref_h.grad),
                            ("weight shard grad", shard.grad, ref_w.grad[rank * rows:(rank + 1) * rows])):
        err = relative_error(got, want)
        assert err < TOLERANCE[torch.float32], f"GRPO {what}: relative error {err:.2e}"


def _check_sampled_logprobs() -> None:
    for seed in range(3):
        assert_sampled_logprobs_match_dense(seed, GROUPS.tp)


CHECKS = {"all_variants": _check_all_variants, "all_padding_shard": _check_all_padding_shard,
          "main_grad_ddp": _check_main_grad_ddp, "grpo_policy_loss": _check_grpo_policy_loss,
          "sampled_logprobs": _check_sampled_logprobs}

if __name__ == "__main__":
    from tests.support.distributed import run_checks

    def setup() -> None:
        global GROUPS
        GROUPS = initialize(Layout(tp=dist.get_world_size()))

    run_checks(CHECKS, setup=setup)
