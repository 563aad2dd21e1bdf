"""Packed forward == per-sequence forward on response positions, tiny Megatron model on CPU (one rank)."""

from tests.support.distributed import torchrun_checks

test_packed_forward = torchrun_checks("tests.workers.data_packed_forward", 1)
