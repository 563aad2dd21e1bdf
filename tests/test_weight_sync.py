"""Weight sync into SGLang stand-ins from a two-rank trainer (``tests/workers/weight_sync.py``)."""
from __future__ import annotations

from pathlib import Path

from tests.support.distributed import torchrun_checks
from tests.support.tiny_models import save_tiny_model
from tests.workers.trainer_common import write_inputs


def _inputs(work: Path) -> list[str]:
    hf_dir = save_tiny_model("qwen3", work / "hf")
    write_inputs(work, hf_dir)
    return ["--hf-dir", str(hf_dir), "--work", str(work)]


test_two_rank_trainer = torchrun_checks("tests.workers.weight_sync", 2, _inputs)
