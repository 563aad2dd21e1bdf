"""Trainer checks in one process (TP=1, PP=1, DP=1) on components built from a config; also
writes the reference gradients that the multi-rank worker compares against."""
from __future__ import annotations

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_opsd.algorithms.opsd.teacher import Teacher, TeacherConfig, TeacherState
from megatron_opsd.models import build_model
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.train.components import Components, build_components
from megatron_opsd.train.loop import Trainer
from megatron_opsd.train.step import NonFiniteError
from tests.support.distributed import run_checks
from tests.support.tiny_models import CONFIGS
from tests.workers.trainer_common import assert_close, config, full_grads, full_params, work_path

# One micro-batch of seven samples; the small default budget packs the same samples into several.
ONE_MICRO_BATCH = ("prompts_per_step=7", "packing.tokens_per_micro_batch=2048", "packing.teacher_tokens_per_micro_batch=4096")


def built(*overrides: str):
    """Components and the first step's micro-batches."""
    c = build_components(config(*overrides))
    batches, _ = Trainer(c).step_batches(1)
    return c, batches


def grads_for(*overrides: str) -> tuple[dict[str, torch.Tensor], int]:
    c, batches = built("prompts_per_step=7", *overrides)
    c.runner.accumulate_gradients(batches)
    return full_grads(c), len(batches)


def check_reference_grads_and_microbatch_independence():
    one, n_one = grads_for(*ONE_MICRO_BATCH)
    many, n_many = grads_for()
    assert n_one == 1 and n_many >= 3, (n_one, n_many)
    assert_close(many, one, 1e-6, f"{n_many} micro-batches vs 1")
    torch.save(one, work_path("reference_grads.pt"))


def _teacher_pass(c: Components, batches):
    (spec,) = c.algorithm.forward_passes
    return c.runner.forward_pass(spec, batches)


def check_overfit_tp1():
    c, batches = built()
    losses = [c.runner(batches).metrics["loss"] for _ in range(10)]
    assert losses[-1] < 0.5 * losses[0], losses


def check_teacher_fixed_no_grad_and_unchanged():
    c, batches = built("algorithm.opsd.teacher.mode=fixed")
    model = c.runner.model
    initial = [p.detach().clone() for p in model.parameters()]
    hidden = _teacher_pass(c, batches)
    assert hidden and not any(h.requires_grad for h in hidden)
    for _ in range(3):
        assert c.runner(batches).applied
    teacher = c.algorithm.teacher
    assert all(not w.requires_grad and w.grad is None for w in teacher.weights)
    assert all(torch.equal(w, p0) for w, p0 in zip(teacher.weights, initial)), "fixed teacher changed"
    assert not all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial)), "student did not train"
    # The teacher pass sees the initial weights and leaves the student's weights in place.
    student = [p.detach().clone() for p in model.parameters()]
    again = _teacher_pass(c, batches)
    assert all(torch.equal(a, b) for a, b in zip(again, hidden)), "teacher pass does not use the initial weights"
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), student)), "student weights not restored"


def check_teacher_ema_matches_hand_computation():
    decay = 0.9
    c, batches = built("algorithm.opsd.teacher.mode=ema", f"algorithm.opsd.teacher.ema_decay={decay}")
    params = list(c.runner.model.parameters())
    expected = [p.detach().clone().double() for p in params]
    for _ in range(3):
        assert c.runner(batches).applied
        expected = [decay * e + (1 - decay) * p.detach().double() for e, p in zip(expected, params)]
    for w, e in zip(c.algorithm.teacher.weights, expected):
        torch.testing.assert_close(w.double(), e, rtol=0, atol=1e-6)
    assert not all(torch.equal(w, p) for w, p in zip(c.algorithm.teacher.weights, params))


def check_teacher_live_is_current_weights():
    c, batches = built("algorithm.opsd.teacher.mode=live")
    for _ in range(2):
        assert c.runner(batches).applied
    hidden = _teacher_pass(c, batches)
    assert not any(h.requires_grad for h in hidden)
    model = c.runner.model
    with torch.no_grad():
        for mb, h in zip(batches, hidden):
            side = mb.teacher
            out = model(side.tokens[None], side.position_ids[None], side.attention_mask(), output="hidden")
            assert torch.equal(out[0, side.predict_positions], h), "live teacher differs from the current weights"


def check_sft_has_no_teacher_and_packs_one_side():
    c, batches = built("algorithm.name=sft")
    assert c.algorithm.forward_passes == () and c.algorithm.states() == {} and "teacher" not in c.states()
    assert all(mb.teacher is None and not mb.per_token for mb in batches)
    metrics = c.runner(batches).metrics
    assert not any("teacher" in k or "mismatch" in k for k in metrics) and metrics["loss"] > 0, sorted(metrics)


def check_nan_skips_step_and_counts():
    c, batches = built("step.max_consecutive_skips=2")
    runner, model = c.runner, c.runner.model
    assert runner(batches).applied
    before = full_params(c)
    hook = model.decoder.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    result = runner(batches)
    hook.remove()
    assert not result.applied and result.metrics["skipped"] == 1 and result.metrics["skipped_total"] == 1, result.metrics
    assert_close(full_params(c), before, 0.0, "parameters after a skipped step")
    result = runner(batches)
    assert result.applied and result.metrics["skipped_total"] == 1, result.metrics
    # Two consecutive non-finite steps stop the run with a clear message.
    hook = model.decoder.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    assert not runner(batches).applied
    try:
        runner(batches)
    except NonFiniteError as exc:
        assert "2 consecutive steps" in str(exc), exc
    else:
        raise AssertionError("no NonFiniteError after 2 consecutive non-finite steps")
    finally:
        hook.remove()


def check_cpu_adamw_is_fused_and_makes_the_single_tensor_update():
    c, batches = built("optim.clip_grad=0", "optim.weight_decay=0.1")
    (inner,) = [opt.optimizer for opt in c.optimizer.chained_optimizers]
    assert all(group["fused"] for group in inner.param_groups), [group["fused"] for group in inner.param_groups]
    pairs = [(p, torch.nn.Parameter(p.detach().clone())) for group in inner.param_groups for p in group["params"]]
    copies = {id(p): r for p, r in pairs}
    single = torch.optim.AdamW(  # the same groups (Megatron exempts norms and biases from decay)
        [{**{k: v for k, v in group.items() if k not in ("params", "fused", "foreach")},
          "params": [copies[id(p)] for p in group["params"]]} for group in inner.param_groups],
        foreach=False, fused=False)
    for _ in range(2):  # the second step has moments to update
        assert c.runner(batches).applied
        for p, r in pairs:
            r.grad = p.grad.detach().clone()
        single.step()
    for p, r in pairs:
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)


def _lookups_sparse(out: torch.Tensor) -> list[bool]:
    """For each embedding lookup in ``out``'s graph: whether its weight gradient is sparse."""
    found, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            if type(node).__name__ == "EmbeddingBackward0":
                found.append(node._saved_sparse)
            stack.extend(fn for fn, _ in node.next_functions)
    return found


def check_embedding_gradient_is_sparse_under_ddp_and_lands_in_main_grad():
    c, _ = built()
    lookup = c.runner.model.embedding.word_embeddings
    weight = lookup.weight
    ids = torch.randint(0, weight.shape[0], (2, 9))
    ids[0, :3] = 5  # a row looked up three times
    upstream = torch.randn(2, 9, weight.shape[1])
    before = weight.main_grad.clone()
    out = lookup(ids)
    assert _lookups_sparse(out) == [True]
    out.backward(upstream)
    expected = before.index_add(0, ids.flatten(), upstream.flatten(0, 1))
    torch.testing.assert_close(weight.main_grad, expected, rtol=1e-6, atol=1e-6)
    assert weight.grad is None  # DDP's hook added it and let it go
    # Outside DDP (the engine's and a teacher's models) the lookup is Megatron's dense one.
    (bare,) = build_model(CONFIGS["qwen3"], torch.float32, groups=c.groups)
    assert _lookups_sparse(bare.embedding.word_embeddings(ids)) == [False]


def check_ema_teacher_of_a_bf16_model_checkpoints_its_fp32_average():
    groups = initialize(Layout())
    chunks = build_model(CONFIGS["qwen3"], torch.bfloat16, groups=groups)
    teacher = Teacher(TeacherConfig(mode="ema"), list(chunks[0].parameters()))
    shards = TeacherState(teacher, chunks).sharded_state_dict()["weights"]
    tensors = [sh for sh in shards.values() if isinstance(sh, ShardedTensor)]
    assert tensors and all(sh.dtype == torch.float32 == sh.data.dtype for sh in tensors)
    assert all(sh.key.startswith("teacher.") for sh in shards.values())


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    run_checks(CHECKS)
