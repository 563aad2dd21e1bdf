"""Packed forward == per-sequence forward on response positions, tiny Megatron model on CPU (one rank)."""
import pytest

from tests.distributed import assert_check, launch
from tests.workers.data_packed_forward import CHECKS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch("tests.workers.data_packed_forward", 1, tmp_path_factory.mktemp("packed_forward"))


@pytest.mark.parametrize("check", list(CHECKS))
def test_packed_forward(results, check):
    assert_check(results, check)
