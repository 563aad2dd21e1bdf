"""The recipes in examples/ (Qwen3 1.7B/4B/8B paper, Llama-3-70B, the GRPO baseline) through their shrunken twins at
TP=2 (two ranks, one launch): a few steps of each recipe's settings, and each architecture's
conversion round trip."""

import pytest

from tests.support.distributed import torchrun_checks

pytestmark = pytest.mark.usefixtures("one_thread")

test_recipe = torchrun_checks("tests.workers.recipes", 2)
