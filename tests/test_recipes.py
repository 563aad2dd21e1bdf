"""The recipes in examples/ (Qwen3 1.7B/4B/8B paper, Llama-3-70B, the GRPO baseline) through their shrunken twins at
TP=2 (two ranks, one launch): a few steps of each recipe's settings, and each architecture's
conversion round trip."""

import pytest

from tests.distributed import assert_check, launch
from tests.workers.recipes import CHECKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("recipes")
    return launch("tests.workers.recipes", 2, work, "--workdir", str(work))


@pytest.mark.parametrize("check", list(CHECKS))
def test_recipe(results, check):
    assert_check(results, check)
