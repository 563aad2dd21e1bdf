"""Models against transformers at TP=1, TP=2 and PP=2 (two ranks, one launch)."""

from tests.support.distributed import torchrun_checks

test_models = torchrun_checks("tests.workers.models_conversion", 2)
