"""Models against transformers at TP=1, TP=2 and PP=2 (two ranks, one launch)."""

import pytest

from tests.distributed import assert_check, launch
from tests.workers.models_conversion import CHECKS


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("models")
    return launch("tests.workers.models_conversion", 2, work, "--workdir", str(work))


@pytest.mark.parametrize("check", list(CHECKS))
def test_models(results, check):
    assert_check(results, check)
