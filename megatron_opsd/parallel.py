"""Parallel layout (TP / PP / CP / DP process groups) and seeds.

Megatron keeps its process groups in the global ``megatron.core.parallel_state``, which is also
the API for ranks and groups; :func:`initialize` (re)builds them, so a single process can switch
layouts (tests compare TP=1, TP=2 and PP=2 in one launch).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_opsd.platform import Platform, init_process_group


@dataclass(frozen=True)
class Layout:
    """Sizes of the parallel dimensions; ``dp`` is whatever the world size leaves."""

    tp: int = 1
    pp: int = 1
    cp: int = 1

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}")
        return world_size // model_parallel


def initialize(layout: Layout = Layout(), seed: int = 1234) -> Platform:
    """Init the process group if needed, (re)build Megatron's groups for ``layout``, seed RNGs.

    ``seed`` is the data-parallel seed; Megatron derives the per-TP-rank seed for dropout in
    tensor-parallel regions from it (``model_parallel_cuda_manual_seed``).
    """
    platform = init_process_group()
    layout.dp(dist.get_world_size())
    if not platform.is_cuda and layout.cp > 1:
        raise ValueError("context parallelism needs Transformer Engine attention (CUDA); use cp=1 on CPU")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
    )
    seed_all(seed)
    return platform


def seed_all(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's tensor-parallel RNG tracker."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
