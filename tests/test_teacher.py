"""Where the teacher's weights come from: fixed (resident or offloaded), EMA with an fp32 accumulator, live."""
from __future__ import annotations

import pytest
import torch

from megatron_opsd.algorithms.opsd.teacher import Teacher, TeacherConfig


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return list(torch.nn.Linear(4, 3).to(dtype).parameters())


@pytest.mark.parametrize("offload", [False, True])
def test_fixed_teacher_swaps_in_and_restores_exactly(offload):
    params = _params()
    teacher = Teacher(TeacherConfig(mode="fixed", offload=offload), params)
    initial = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    student = [p.detach().clone() for p in params]
    with teacher.weights_in_model():
        assert all(torch.equal(p, i) for p, i in zip(params, initial))
    assert all(torch.equal(p, s) for p, s in zip(params, student))
    assert torch.equal(teacher.weight_of(params[0]), initial[0])


def test_ema_teacher_keeps_fp32_accumulator_for_bf16_params():
    params = _params(torch.bfloat16)
    teacher = Teacher(TeacherConfig(mode="ema", ema_decay=0.999), params)
    assert teacher.master is not None and teacher.master[0].dtype == torch.float32
    expected = [p.detach().double() for p in params]
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(0.5)
        teacher.update()
        expected = [0.999 * e + 0.001 * p.detach().double() for e, p in zip(expected, params)]
    for m, w, e in zip(teacher.master, teacher.weights, expected):
        torch.testing.assert_close(m.double(), e, rtol=0, atol=1e-6)
        assert torch.equal(w, m.to(torch.bfloat16))
    # A bf16 accumulator would not have moved at all: 0.001 * 0.5 is below bf16 resolution near 1.
    assert not torch.equal(teacher.weights[0], _params(torch.bfloat16)[0].detach())


def test_live_teacher_holds_no_copy():
    params = _params()
    teacher = Teacher(TeacherConfig(mode="live"), params)
    assert teacher.state_tensors() is None
    assert teacher.weight_of(params[0]) is not params[0] and torch.equal(teacher.weight_of(params[0]), params[0])
    assert not teacher.weight_of(params[0]).requires_grad
