"""The training step across layouts, teacher modes, SFT, non-finite handling and exact resume, on
components built from a config (recorded rollouts through the engine factory).

Launch order matters: the single-process worker writes the reference gradients the two-rank
worker compares against; the two-rank worker's uninterrupted run is what the kill/resume pair
must reproduce.
"""
from __future__ import annotations

import json

import pytest

from tests.support.distributed import assert_check, launch
from tests.support.tiny_models import save_tiny_model
from tests.workers.trainer_common import write_inputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("trainer")
    hf_dir = save_tiny_model("qwen3", work / "hf")
    write_inputs(work, hf_dir)
    common = ("--hf-dir", str(hf_dir), "--work", str(work))
    results = {"single": launch("tests.workers.trainer_single", 1, work, *common)}
    results["multi"] = launch("tests.workers.trainer", 2, work, *common)
    try:  # expected to die by SIGKILL, writing no results
        results["killed"] = launch("tests.workers.trainer_resume", 2, work, "--only", "first_three_then_killed", *common)
    except RuntimeError as exc:
        assert "wrote no results" in str(exc), exc
        results["killed"] = None
    results["resume"] = launch("tests.workers.trainer_resume", 2, work, "--only", "resume", *common)
    return work, results


SINGLE = ["reference_grads_and_microbatch_independence", "overfit_tp1", "teacher_fixed_no_grad_and_unchanged",
          "teacher_ema_matches_hand_computation", "teacher_live_is_current_weights", "sft_has_no_teacher_and_packs_one_side",
          "nan_skips_step_and_counts", "ema_teacher_of_a_bf16_model_checkpoints_its_fp32_average",
          "cpu_adamw_is_fused_and_makes_the_single_tensor_update",
          "embedding_gradient_is_sparse_under_ddp_and_lands_in_main_grad"]
MULTI = ["grads_tp2", "grads_pp2", "grads_dp2", "overfit_tp2", "overfit_pp2", "uninterrupted_run",
         "tp2_checkpoint_resumes_at_tp1"]


@pytest.mark.parametrize("name", SINGLE)
def test_single_process(runs, name):
    assert_check(runs[1]["single"], name)


@pytest.mark.parametrize("name", MULTI)
def test_two_ranks(runs, name):
    assert_check(runs[1]["multi"], name)


def test_killed_run_resumes_with_identical_losses(runs):
    work, results = runs
    assert results["killed"] is None, f"the first run was not killed: {results['killed']}"
    assert_check(results["multi"], "uninterrupted_run")
    assert_check(results["resume"], "resume")
    uninterrupted = json.loads((work / "losses_uninterrupted.json").read_text())
    resumed = json.loads((work / "losses_resumed.json").read_text())  # steps 1-3 before the kill, 4-6 after
    assert len(uninterrupted) == 6
    assert resumed == uninterrupted
