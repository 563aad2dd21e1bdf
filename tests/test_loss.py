"""OPSD loss: fused vs dense reference (TP=1 here, TP=2 in tests/workers/loss_tp.py), properties,
config validation."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from megatron_opsd.algorithms.opsd.divergence import LossConfig, dense_token_divergence
from megatron_opsd.algorithms.opsd.loss import fused_token_divergence
from tests.support.distributed import torchrun_checks
from tests.workers.loss_tp import (
    TOLERANCE,
    VARIANTS,
    assert_matches_dense,
    assert_sampled_logprobs_match_dense,
    dense_reference,
    fused,
    make_case,
    relative_error,
)

PROPERTY = settings(max_examples=25, deadline=None)
DIVERGENCES = [v for v in VARIANTS if v != "sampled_token"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform-upstream", "per-token-upstream"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_dense(variant: str, uniform: bool, dtype: torch.dtype) -> None:
    assert_matches_dense(make_case(variant, seed=list(VARIANTS).index(variant), uniform=uniform), dtype)


@pytest.mark.parametrize("variant", [v for v in DIVERGENCES if "clipon" in v or "topk" in v])
def test_cases_exercise_clip_and_top_k(variant: str) -> None:
    """The comparison cases are not degenerate: clipping and top-k change the loss."""
    case = make_case(variant, seed=list(VARIANTS).index(variant))
    loss = dense_reference(case)[0]
    for field in ("clip", "top_k"):
        if getattr(case.cfg, field) is not None:
            off = dataclasses.replace(case, cfg=case.cfg.model_copy(update={field: None}))
            assert (dense_reference(off)[0] - loss).abs().max() > 1e-6, f"{field} has no effect"


@pytest.mark.parametrize("weight_grad_fp32", [True, False])
def test_bf16_inputs(weight_grad_fp32: bool) -> None:
    """bf16 hidden and weights against float64 on the same (rounded) values: bf16-level agreement."""
    case = make_case("forward_kl-clipon-topall", seed=3, uniform=False)
    case.cfg = case.cfg.model_copy(update={"weight_grad_fp32": weight_grad_fp32})
    for name in ("student_hidden", "teacher_hidden", "student_weight", "teacher_weight"):
        setattr(case, name, getattr(case, name).bfloat16().double())
    loss, grad_h, grad_w, _ = fused(case, torch.bfloat16)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == torch.bfloat16
    ref = dense_reference(case)
    for actual, expected in zip((loss, grad_h, grad_w), ref):
        assert (actual.double() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("seed", range(4))
def test_sampled_logprobs_come_from_the_losss_logits(seed: int) -> None:
    assert_sampled_logprobs_match_dense(seed)


def test_the_default_chunk_suits_the_device() -> None:
    """Small chunks on CPU (their blocks stay in cache and allocated), large ones on a GPU (few GEMMs,
    two TP all-reduces per chunk); a chunk_size set is used everywhere."""
    cfg = LossConfig(vocab_size=10)
    assert cfg.chunk_rows(torch.device("cpu")) == 128 and cfg.chunk_rows(torch.device("cuda", 0)) == 2048
    assert cfg.model_copy(update={"chunk_size": 64}).chunk_rows(torch.device("cuda", 0)) == 64


def test_chunk_size_invariance() -> None:
    """The per-token loss does not depend on how tokens are chunked."""
    case = make_case("jsd-clipon-topk", seed=11)
    loss = fused(case, torch.float64)[0]
    case.cfg = case.cfg.model_copy(update={"chunk_size": 1000})
    torch.testing.assert_close(fused(case, torch.float64)[0], loss, rtol=1e-12, atol=1e-14)


def _same_teacher(case):
    return dataclasses.replace(case, teacher_hidden=case.student_hidden, teacher_weight=case.student_weight)


@PROPERTY
@given(seed=st.integers(0, 2**20), variant=st.sampled_from(list(VARIANTS)))
def test_zero_when_teacher_is_student(seed: int, variant: str) -> None:
    loss, grad_h, grad_w, _ = fused(_same_teacher(make_case(variant, seed, uniform=False)), torch.float64)
    for t in (loss, grad_h, grad_w):
        assert t.abs().max() < 1e-12


@PROPERTY
@given(seed=st.integers(0, 2**20), variant=st.sampled_from([v for v in DIVERGENCES if "kl-clipoff" in v]))
def test_kl_nonnegative_without_clip(seed: int, variant: str) -> None:
    assert fused(make_case(variant, seed), torch.float64)[0].min() >= -1e-12


@PROPERTY
@given(seed=st.integers(0, 2**20), beta=st.floats(0.01, 0.99), top_k=st.booleans(), scale=st.floats(0.1, 30.0))
def test_jsd_entropy_bound(seed: int, beta: float, top_k: bool, scale: float) -> None:
    """0 <= JSD_beta <= -beta ln beta - (1 - beta) ln(1 - beta), approached by far-apart logits."""
    case = make_case(f"jsd-clipoff-top{'k' if top_k else 'all'}", seed)
    case.cfg = case.cfg.model_copy(update={"beta": beta})
    case.teacher_weight = case.student_weight + scale * (case.teacher_weight - case.student_weight)
    loss = fused(case, torch.float64)[0]
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert loss.min() >= -1e-12 and loss.max() <= bound + 1e-12


def test_jsd_endpoints_are_kls() -> None:
    for beta, kind in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        case = make_case("jsd-clipon-topall", seed=5)
        jsd = fused(dataclasses.replace(case, cfg=case.cfg.model_copy(update={"beta": beta})), torch.float64)
        kl_cfg = case.cfg.model_copy(update={"beta": None, "divergence": kind})
        kl = fused(dataclasses.replace(case, cfg=kl_cfg), torch.float64)
        for a, b in zip(jsd, kl):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["forward_kl-clipon-topk", "sampled_token"])
def test_teacher_gets_no_gradient(variant: str) -> None:
    case = make_case(variant, seed=2)
    hs, ws = case.student_hidden.clone().requires_grad_(), case.student_weight.clone().requires_grad_()
    ht, wt = case.teacher_hidden.clone().requires_grad_(), case.teacher_weight.clone().requires_grad_()
    fused_token_divergence(hs, ht, ws, wt, case.cfg, case.target_ids).sum().backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad.abs().max() > 0 and ws.grad.abs().max() > 0


@pytest.mark.parametrize("variant", ["reverse_kl-clipon-topall", "jsd-clipoff-topk", "sampled_token"])
def test_masked_tokens_contribute_nothing(variant: str) -> None:
    """loss * mask (recompute path) == the loss over the valid tokens only (precompute path)."""
    case = make_case(variant, seed=9, uniform=False)
    keep = case.upstream > 0
    assert 0 < keep.sum() < keep.numel()
    _, grad_h, grad_w, _ = fused(dataclasses.replace(case, upstream=keep.double()), torch.float64)
    valid = dataclasses.replace(
        case, student_hidden=case.student_hidden[keep], teacher_hidden=case.teacher_hidden[keep],
        target_ids=None if case.target_ids is None else case.target_ids[keep],
        upstream=torch.ones(int(keep.sum()), dtype=torch.float64))
    _, valid_h, valid_w, _ = fused(valid, torch.float64)
    assert grad_h[~keep].abs().max() == 0
    torch.testing.assert_close(grad_h[keep], valid_h, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(grad_w, valid_w, rtol=1e-10, atol=1e-14)


def test_second_backward_and_no_grad() -> None:
    """Precomputed products are used once; a retained graph's second backward recomputes."""
    case = make_case("forward_kl-clipon-topk", seed=4)
    hs, ws = case.student_hidden.clone().requires_grad_(), case.student_weight.clone().requires_grad_()
    total = fused_token_divergence(hs, case.teacher_hidden, ws, case.teacher_weight, case.cfg).sum()
    first = torch.autograd.grad(total, (hs, ws), retain_graph=True)
    second = torch.autograd.grad(total, (hs, ws))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    with torch.no_grad():
        again = fused_token_divergence(hs, case.teacher_hidden, ws, case.teacher_weight, case.cfg)
    torch.testing.assert_close(again, dense_reference(case)[0], rtol=1e-10, atol=1e-14)


def _main_grad_weight(case, dtype: torch.dtype) -> torch.nn.Parameter:
    """The student weight as a parameter with a Megatron-DDP-style ``main_grad`` already holding
    a (small, so that fp32 differences stay exact enough) gradient, which the loss must add to."""
    ws = torch.nn.Parameter(case.student_weight.to(dtype, copy=True))
    ws.main_grad = 1e-3 * torch.randn(ws.shape, dtype=torch.promote_types(dtype, torch.float32),
                                      generator=torch.Generator().manual_seed(0))
    return ws


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_main_grad_matches_dense(variant: str, dtype: torch.dtype) -> None:
    """With ``main_grad_scale`` the weight gradient is added to ``main_grad`` (autograd gets none)
    and equals the dense reference for an upstream gradient of that scale."""
    case = make_case(variant, seed=list(VARIANTS).index(variant))
    scale = 0.25
    case.upstream = torch.full_like(case.upstream, scale)
    ws = _main_grad_weight(case, dtype)
    before = ws.main_grad.clone()
    hs = case.student_hidden.to(dtype, copy=True).requires_grad_()
    loss = fused_token_divergence(hs, case.teacher_hidden.to(dtype), ws, case.teacher_weight.to(dtype), case.cfg,
                                  case.target_ids, main_grad_scale=scale)
    (loss.sum() * scale).backward()
    ref_loss, ref_h, ref_w = dense_reference(case)
    assert ws.grad is None
    for name, actual, expected in (("loss", loss, ref_loss), ("grad hidden", hs.grad, ref_h),
                                   ("main_grad", ws.main_grad - before, ref_w)):
        err = relative_error(actual.detach(), expected)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("upstream", ["other-scale", "per-token"])
def test_main_grad_broken_promise_raises(upstream: str) -> None:
    case = make_case("reverse_kl-clipon-topk", seed=6)
    ws = _main_grad_weight(case, torch.float64)
    loss = fused_token_divergence(case.student_hidden, case.teacher_hidden, ws, case.teacher_weight, case.cfg,
                                  main_grad_scale=1.0)
    weights = torch.full_like(loss, 0.5) if upstream == "other-scale" else torch.rand_like(loss)
    with pytest.raises(RuntimeError, match=r"main_grad_scale=1\.0.*main_grad is now wrong"):
        (loss * weights).sum().backward()


def test_main_grad_untouched_without_backward_graph() -> None:
    """no_grad, or a weight that does not require grad: plain forward, main_grad unchanged."""
    case = make_case("jsd-clipon-topk", seed=8)
    ws = _main_grad_weight(case, torch.float64)
    before = ws.main_grad.clone()
    with torch.no_grad():
        loss = fused_token_divergence(case.student_hidden, case.teacher_hidden, ws, case.teacher_weight, case.cfg,
                                      main_grad_scale=1.0)
    ws.requires_grad_(False)
    hs = case.student_hidden.clone().requires_grad_()
    loss_hs = fused_token_divergence(hs, case.teacher_hidden, ws, case.teacher_weight, case.cfg, main_grad_scale=1.0)
    loss_hs.sum().backward()
    torch.testing.assert_close(loss, dense_reference(case)[0], rtol=1e-10, atol=1e-14)
    assert torch.equal(ws.main_grad, before) and hs.grad.abs().max() > 0


def test_main_grad_second_backward_goes_through_autograd() -> None:
    """A retained graph's second backward recomputes and returns the weight gradient normally."""
    case = make_case("forward_kl-clipoff-topall", seed=10)
    ws = _main_grad_weight(case, torch.float64)
    before = ws.main_grad.clone()
    total = fused_token_divergence(case.student_hidden, case.teacher_hidden, ws, case.teacher_weight, case.cfg,
                                   main_grad_scale=1.0).sum()
    total.backward(retain_graph=True)
    added = ws.main_grad - before
    assert ws.grad is None
    total.backward()
    torch.testing.assert_close(ws.grad, added, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ws.main_grad - before, added, rtol=0, atol=0)


def test_input_errors() -> None:
    case = make_case("sampled_token", seed=1)
    args = (case.student_hidden, case.teacher_hidden, case.student_weight, case.teacher_weight, case.cfg)
    with pytest.raises(ValueError, match="target_ids"):
        fused_token_divergence(*args)
    with pytest.raises(ValueError, match="vocab_size"):
        fused_token_divergence(*args, target_ids=torch.full_like(case.target_ids, case.cfg.vocab_size))
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_token_divergence(*args[:2], args[2][:, :-1], *args[3:], target_ids=case.target_ids)
    trained = case.student_weight.detach().clone().requires_grad_()  # a frozen one (LoRA) needs no main_grad
    with pytest.raises(ValueError, match="main_grad_scale needs student_weight.main_grad"):
        fused_token_divergence(*args[:2], trained, *args[3:], target_ids=case.target_ids, main_grad_scale=1.0)
    small = case.cfg.model_copy(update={"vocab_size": case.student_weight.shape[0] + 1})
    with pytest.raises(ValueError, match="cannot hold"):
        fused_token_divergence(*args[:4], small, target_ids=case.target_ids)
    with pytest.raises(ValueError, match="target_ids"):
        dense_token_divergence(case.student_hidden, case.teacher_hidden,
                               case.cfg.model_copy(update={"sampled_token": False}), case.target_ids)


@pytest.mark.parametrize("fields, message", [
    ({"divergence": "jsd"}, "needs beta"),
    ({"beta": 0.5}, "only applies"),
    ({"divergence": "jsd", "beta": 1.5}, "less than or equal"),
    ({"temperature": 0.0}, "greater than 0"),
    ({"clip": -1.0}, "greater than 0"),
    ({"top_k": 200}, "exceeds vocab_size"),
    ({"sampled_token": True}, "set clip: null"),
    ({"divergence": "kl"}, "forward_kl"),
    ({"chunk": 4}, "Extra inputs"),
])
def test_config_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LossConfig(vocab_size=100, **fields)


def test_config_defaults_and_kind() -> None:
    cfg = LossConfig(vocab_size=10)
    defaults = (cfg.divergence, cfg.temperature, cfg.clip, cfg.top_k, cfg.sampled_token, cfg.weight_grad_fp32,
                cfg.weight_grad_chunks)
    assert defaults == ("forward_kl", 1.1, 0.05, None, False, True, 1)
    assert LossConfig(vocab_size=10, divergence="jsd", beta=0.0).kind == "forward_kl"
    assert LossConfig(vocab_size=10, divergence="jsd", beta=1.0).kind == "reverse_kl"
    assert LossConfig(vocab_size=10, divergence="jsd", beta=0.5).kind == "jsd"


test_tp2 = torchrun_checks("tests.workers.loss_tp", 2)
