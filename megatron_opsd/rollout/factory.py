"""The ``rollout.engine`` config section and the one place engines are built from it."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag
from transformers import PretrainedConfig

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.rollout.recorded import RecordedEngineConfig, RecordedRolloutEngine


def _kind(value: Any) -> str:
    """An engine section without ``kind`` is the embedded engine's (so ``rollout.engine.max_batch_size=8`` works alone)."""
    return value.get("kind", "embedded") if isinstance(value, dict) else getattr(value, "kind", "")


EngineConfig = Annotated[Annotated[EmbeddedEngineConfig, Tag("embedded")] | Annotated[RecordedEngineConfig, Tag("recorded")],
                         Discriminator(_kind)]


def build_engine(cfg: EmbeddedEngineConfig | RecordedEngineConfig, hf_config: PretrainedConfig) -> RolloutEngine:
    """The engine ``cfg.kind`` names, for a model of ``hf_config`` (an embedded engine starts with
    random weights: a weight sync brings the trainer's)."""
    if cfg.kind == "embedded":
        return EmbeddedEngine.from_hf_config(hf_config, cfg)
    return RecordedRolloutEngine.load(cfg.path)
