"""The one place a weight sync is built from ``rollout.sync`` (``kind``), for the engine it feeds."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megatron_opsd.rollout.embedded import EmbeddedEngine
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.rollout.factory import EngineSection
from megatron_opsd.rollout.remote.engine import RemoteEngine
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.engine import SGLangEngine
from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig, WeightSync
from megatron_opsd.rollout.sync.disk import DiskSync
from megatron_opsd.rollout.sync.distributed import DistributedSync, nccl_environment
from megatron_opsd.rollout.sync.inprocess import InProcessSync
from megatron_opsd.rollout.sync.vllm_transfer import VLLMTransferSync
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.engine import VLLMEngine

FEEDS: dict[str, tuple[type, ...]] = {"inprocess": (EmbeddedEngine,), "disk": (RemoteEngine,),
                                      "distributed": (SGLangEngine, VLLMEngine)}


def build_weight_sync(cfg: SyncConfig, engine: RolloutEngine | None, chunks: Sequence[torch.nn.Module],
                      probe: ProbeCheck, engine_cfg: EngineSection, root: Path,
                      write_files: Callable[[Path], None], *, rollouts_ahead: bool = False) -> WeightSync | None:
    """The strategy ``cfg.kind`` names; None for ``none``. ``engine`` is this rank's (None off rank
    0), built from ``engine_cfg``; versions are written under ``root`` (disk, and distributed's
    recovery), each with ``write_files(dir)`` (config, tokenizer). An in-process engine shares the
    trainer's weights when it is synced every step and does not sample ahead (``rollouts_ahead``)."""
    if cfg.kind == "none":
        return None
    if engine is not None and not isinstance(engine, FEEDS[cfg.kind]):
        raise ValueError(f"rollout.sync.kind={cfg.kind} feeds the {' or '.join(t.__name__ for t in FEEDS[cfg.kind])}, "
                         f"not {type(engine).__name__}")
    if cfg.kind == "inprocess":
        return InProcessSync(engine, chunks, probe, share=cfg.interval == 1 and not rollouts_ahead)
    if cfg.kind == "disk":
        return DiskSync(engine, chunks, probe, root, cfg.keep_last, write_files)
    if isinstance(engine_cfg, VLLMEngineConfig):
        if engine_cfg.servers.weight_transfer is None:
            raise ValueError("rollout.sync.kind=distributed to vLLM needs rollout.engine.servers.weight_transfer "
                             "(nccl or gloo): the servers open it at start-up")
        return VLLMTransferSync(engine, chunks, probe, cfg, root, write_files, engine_cfg.host,
                                engine_cfg.servers.weight_transfer, engine_cfg.timeouts.control_s)
    if not isinstance(engine_cfg, SGLangEngineConfig):
        raise TypeError(f"rollout.sync.kind=distributed feeds SGLang servers, not rollout.engine.kind={engine_cfg.kind}")
    return DistributedSync(engine, chunks, probe, cfg, root, write_files, engine_cfg.host,
                           engine_cfg.timeouts.control_s)


def process_environment(cfg: SyncConfig, engine_cfg: EngineSection, cuda: bool) -> dict[str, str]:
    """Environment variables the trainer's process must have before its first NCCL communicator for
    this weight sync (set them only where unset: a value the user chose reaches the servers too)."""
    nccl = cuda and cfg.backend in ("auto", "nccl")
    if cfg.kind == "distributed" and isinstance(engine_cfg, SGLangEngineConfig) and nccl:
        return nccl_environment()
    return {}
