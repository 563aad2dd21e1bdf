"""Weight sync into SGLang stand-ins from a two-rank trainer (``tests/workers/weight_sync.py``)."""
from __future__ import annotations

import pytest

from tests.distributed import assert_check, launch
from tests.tiny_models import save_tiny_model
from tests.workers.trainer_common import write_inputs
from tests.workers.weight_sync import CHECKS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("weight_sync")
    hf_dir = save_tiny_model("qwen3", work / "hf")
    write_inputs(work, hf_dir)
    return launch("tests.workers.weight_sync", 2, work, "--hf-dir", str(hf_dir), "--work", str(work))


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_two_rank_trainer(results, name):
    assert_check(results, name)
