"""GRPO: group advantages, the clipped policy-gradient loss and its gradients against a dense float64
reference (TP=1 here, TP=2 in tests/workers/loss_tp.py), and a few GRPO steps of the tiny model."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_opsd.algorithms.grpo import GRPOConfig, group_advantages, policy_loss
from megatron_opsd.cli import main
from megatron_opsd.parallel import Layout, initialize, teardown
from megatron_opsd.tracking import read_metrics
from tests.support.train_configs import REPO, losses, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_advantages_are_group_normalized_and_zero_without_signal():
    assert group_advantages([1.0, 1.0, 1.0, 1.0], std_normalize=True) == [0.0] * 4
    unit = 0.5 / (0.5 + 1e-4)  # (r - mean) / (std + 1e-4) with mean = std = 0.5
    assert group_advantages([1.0, 0.0, 0.0, 1.0], std_normalize=True) == pytest.approx([unit, -unit, -unit, unit])
    assert group_advantages([1.0, 0.0, 0.0, 0.0], std_normalize=False) == [0.75, -0.25, -0.25, -0.25]


def dense_reference(hidden, weight, targets, advantage, token_weight, old, cfg, vocab, temperature):
    """float64, full vocabulary, plain autograd."""
    logits = (hidden @ weight.T)[:, :vocab] / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    ratio = torch.exp(logp - (logp.detach() if old is None else old))
    high = cfg.clip_eps_high or cfg.clip_eps
    return -torch.minimum(ratio * advantage, ratio.clamp(1 - cfg.clip_eps, 1 + high) * advantage) * token_weight


@pytest.fixture(scope="module")
def tp1():
    yield initialize(Layout())
    teardown()


@pytest.mark.parametrize("old_kind", ["current", "rollout"])
def test_policy_loss_and_gradients_match_float64(tp1, old_kind):
    g = torch.Generator().manual_seed(3)
    n, h, vocab, padded = 13, 8, 29, 32
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(padded, h, generator=g, dtype=torch.float64)
    weight[vocab:] = 0
    targets = torch.randint(0, vocab, (n,), generator=g)
    advantage = torch.randn(n, generator=g, dtype=torch.float64)
    token_weight = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    cfg = GRPOConfig(clip_eps=0.1, clip_eps_high=0.3, chunk_size=5)
    old = None
    if old_kind == "rollout":  # a sampler that differs from the trainer: some ratios leave the clip range
        logits = (hidden @ weight.T)[:, :vocab] / 1.1
        old = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
        old = old + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)
    ours_h, ours_w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    per_token, clipped, _ = policy_loss(ours_h, ours_w, targets, advantage.float(), token_weight.float(),
                                        None if old is None else old.float(), cfg, vocab_size=vocab, temperature=1.1,
                                        groups=tp1)
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = dense_reference(ref_h, ref_w, targets, advantage, token_weight, old, cfg, vocab, 1.1)
    torch.testing.assert_close(per_token.double(), reference, rtol=1e-5, atol=1e-6)
    per_token.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(ours_h.grad.double(), ref_h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours_w.grad.double(), ref_w.grad, rtol=1e-4, atol=1e-6)
    if old_kind == "rollout":
        assert 0 < int(clipped.sum()) < n  # the clip decided some tokens, not all


def grpo_run(tmp_path, hf_dir, steps: int):
    algorithm = {"name": "grpo", "grpo": {"n": 4}, "opsd": {"loss": {}}}
    data = {"path": str(REPO / "data/arith/train.jsonl"), "fields": {"solution": None}}  # GRPO reads answers only
    return write_config(tmp_path, hf_dir, steps=steps, prompts_per_step=2, algorithm=algorithm, eval={"data": None},
                        data=data,
                        checkpoint={"interval": 2, "keep_last": 2},
                        rollout={"max_new_tokens": 12, "stop_tokens": ["<|im_end|>"], "temperature": 1.0,
                                 "sync": {"probe_tolerance": 1e-3, "probe_tokens": 48}})


def test_grpo_steps_log_rewards_and_a_continued_run_equals_the_whole_one(tmp_path, hf_dir):
    assert main(["train", str(grpo_run(tmp_path / "whole", hf_dir, steps=4))]) == 0
    records = [r for r in read_metrics(tmp_path / "whole" / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert 0.0 <= r["reward_mean"] <= 1.0 and 0.0 <= r["groups_without_signal"] <= 1.0
        assert math.isfinite(r["loss"]) and r["clip_fraction"] == 0.0  # on-policy: the clip never decides
        assert r["rollout/generated_tokens"] == r["response_tokens"] > 0  # every sampled token is trained on
    assert main(["train", str(grpo_run(tmp_path / "parts", hf_dir, steps=2))]) == 0
    assert main(["train", str(grpo_run(tmp_path / "parts", hf_dir, steps=4))]) == 0  # resumes at step 2
    assert losses(tmp_path / "parts" / "run") == losses(tmp_path / "whole" / "run")
