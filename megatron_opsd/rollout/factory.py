"""The ``rollout.engine`` config section and the one place engines are built from it."""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Discriminator, Tag
from transformers import PretrainedConfig

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.rollout.recorded import RecordedEngineConfig, RecordedRolloutEngine
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig

API_KEY_ENV = "OPSD_SGLANG_API_KEY"  # the job's key for servers started elsewhere (generated otherwise; vLLM's too)


def _kind(value: Any) -> str:
    """An engine section without ``kind`` is the embedded engine's (so ``rollout.engine.max_batch_size=8`` works alone)."""
    return value.get("kind", "embedded") if isinstance(value, dict) else getattr(value, "kind", "")


EngineSection = EmbeddedEngineConfig | RecordedEngineConfig | SGLangEngineConfig | VLLMEngineConfig
FleetSection = SGLangEngineConfig | VLLMEngineConfig
EngineConfig = Annotated[Annotated[EmbeddedEngineConfig, Tag("embedded")] | Annotated[RecordedEngineConfig, Tag("recorded")]
                         | Annotated[SGLangEngineConfig, Tag("sglang")] | Annotated[VLLMEngineConfig, Tag("vllm")],
                         Discriminator(_kind)]
# The engines that sample from a model's weights (what ``opsd eval`` may use).
SamplingEngineConfig = Annotated[Annotated[EmbeddedEngineConfig, Tag("embedded")]
                                 | Annotated[SGLangEngineConfig, Tag("sglang")] | Annotated[VLLMEngineConfig, Tag("vllm")],
                                 Discriminator(_kind)]


def build_engine(cfg: EngineSection, hf_config: PretrainedConfig, workdir: Path,
                 write_model_files: Callable[[Path], None], device: torch.device | None = None) -> RolloutEngine:
    """The engine ``cfg.kind`` names, for a model of ``hf_config``, beside a trainer computing on
    ``device``. Engines start with random weights: a weight sync brings the trainer's. The embedded
    engine runs on ``device``; a fleet's servers started here take GPUs the trainer's ranks on
    this node do not (``LOCAL_WORLD_SIZE`` of them). A server fleet (SGLang, vLLM) keeps its logs
    and the model directory it starts from (``write_model_files(dir)``: config and tokenizer) in ``workdir``."""
    if cfg.kind == "embedded":
        return EmbeddedEngine.from_hf_config(hf_config, cfg, device)
    if cfg.kind == "recorded":
        return RecordedRolloutEngine.load(cfg.path)
    model_dir = workdir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    write_model_files(model_dir)
    trainer_gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device is not None and device.type == "cuda" else 0
    return start_fleet(cfg, model_dir, workdir / "logs", hf_config.vocab_size, load_format="dummy",
                       trainer_gpus=trainer_gpus)


def start_fleet(cfg: FleetSection, model_dir: Path, log_dir: Path, vocab_size: int,
                load_format: str | None = None, trainer_gpus: int = 0) -> RolloutEngine:
    """The engine over the servers of ``cfg`` (started here or adopted) serving the HF directory
    ``model_dir`` as weight version 0 (``load_format`` ``dummy``: random weights from its config);
    their logs in ``log_dir``; servers started here on GPUs take none of the first ``trainer_gpus``.
    A fleet that fails to start stops the servers that did."""
    api_key = os.environ.get(API_KEY_ENV) or (None if cfg.urls else secrets.token_urlsafe(24))
    if cfg.kind == "vllm":
        from megatron_opsd.rollout.vllm.engine import VLLMEngine, VLLMFleet

        fleet, engine_type = VLLMFleet(cfg, log_dir, api_key, trainer_gpus), VLLMEngine
    else:
        from megatron_opsd.rollout.sglang.engine import SGLangEngine
        from megatron_opsd.rollout.sglang.fleet import Fleet

        fleet, engine_type = Fleet(cfg, log_dir, api_key, trainer_gpus), SGLangEngine
    try:
        fleet.start(str(model_dir), version=0, load_format=load_format)
    except BaseException:
        fleet.stop()
        raise
    return engine_type(fleet, cfg, vocab_size, run_id=secrets.token_hex(4))
