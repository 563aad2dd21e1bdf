"""LoRA on Megatron's tensor-parallel linears against HF PEFT at TP=1, TP=2, PP=2, and with the norm inside
q/k/v and gate/up as Transformer Engine builds them (two ranks, one launch)."""

import pytest

from tests.distributed import assert_check, launch
from tests.workers.lora import CHECKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    return launch("tests.workers.lora", 2, work, "--workdir", str(work))


@pytest.mark.parametrize("check", list(CHECKS))
def test_lora(results, check):
    assert_check(results, check)
