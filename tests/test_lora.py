"""LoRA on Megatron's tensor-parallel linears against HF PEFT at TP=1, TP=2, PP=2, and with the norm inside
q/k/v and gate/up as Transformer Engine builds them (two ranks, one launch)."""

import pytest

from tests.support.distributed import torchrun_checks

pytestmark = pytest.mark.usefixtures("one_thread")

test_lora = torchrun_checks("tests.workers.lora", 2)
