from pathlib import Path

import pytest
import torch

from tests.support.tiny_models import save_tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the CI machine is oversubscribed, more threads per process only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 HF directory (vocab 1000 >= the shipped tokenizer's 752), one per module."""
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("model") / "hf")
