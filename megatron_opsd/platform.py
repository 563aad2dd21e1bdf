"""Device and communication backend: CUDA + NCCL when present, otherwise CPU + gloo.

Megatron-core assumes CUDA in a handful of places (``torch.cuda.current_device()`` as an
allocation device, CUDA RNG state for its RNG tracker, ``device="cuda"`` buffers in the pipeline
schedules and optimizers, default causal masks built on the GPU). On a machine without CUDA
``init_process_group`` applies :func:`_adapt_megatron_to_cpu` once, which redirects exactly those
to the CPU. This module is the only place in the project that does so, and it does nothing when
CUDA is available.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import resource
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Platform:
    """Where tensors live and which collective backend connects the ranks."""

    device: torch.device
    backend: str

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def detect() -> Platform:
    """CUDA + NCCL if a GPU is visible, else CPU + gloo."""
    if torch.cuda.is_available():
        return Platform(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))), "nccl")
    return Platform(torch.device("cpu"), "gloo")


def current_device() -> torch.device:
    """This rank's compute device: its CUDA device, else the CPU (collective buffers live here)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def reset_peak_memory() -> None:
    """Start a new peak for :func:`peak_memory_bytes` (on CUDA; a process's peak RSS cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory since :func:`reset_peak_memory` on GPU; peak resident set size of this
    process so far on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def release_free_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    Setup leaves hundreds of MB free but resident in the heap: parsing a 150k-token tokenizer
    (Python and Rust objects), building models. glibc returns a heap's free memory only from its
    top, so fragments stay resident for the rest of the run; every later large tensor is mapped
    fresh, on top of them.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library (musl): it has no malloc_trim
            pass


def init_process_group(timeout_s: float = 1800) -> Platform:
    """Join (or create) the default process group and prepare Megatron for this platform.

    Works under torchrun (rank/world from the environment) and as a plain single process
    (world size 1 on a free local port), and accepts a group that is already initialized.
    """
    platform = detect()
    if platform.is_cuda:
        torch.cuda.set_device(platform.device)
    else:
        _adapt_megatron_to_cpu()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ:  # torchrun (or another launcher) set up the rendezvous
            dist.init_process_group(platform.backend, timeout=timeout)
        else:  # a world of one, on a free local port; the environment stays as it was for child processes
            dist.init_process_group(platform.backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                    world_size=1, timeout=timeout)
    return platform


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_available(host: str, port: int) -> bool:
    """Whether a listening socket could bind ``host:port`` now."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _to_cpu_device(device):
    """A CUDA device spec (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, a bare index) -> CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA device arguments of torch calls to the CPU (Megatron's ``device="cuda"`` buffers)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The distributed optimizer accepts only "torch.cuda.*Tensor" type names. Parameter
            # passes through here twice (subclass dispatch), hence the guard.
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_ADAPTED = False


def _adapt_megatron_to_cpu() -> None:
    """Point Megatron's CUDA-only calls at the CPU. Idempotent; only called without CUDA."""
    global _ADAPTED
    if _ADAPTED:
        return
    from megatron.core.tensor_parallel import random as mp_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    # The RNG tracker forks "CUDA" RNG states for tensor-parallel regions: use the CPU generator.
    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    mp_random._set_cuda_rng_state = set_rng_state
    # Allocation device, stream sync and timers.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpu().__enter__()
    _ADAPTED = True
