"""The config tree of ``opsd train``: one typed section per component, composed here.

Sections are defined next to the code that reads them (``DataConfig`` in ``data/sources.py``,
``LossConfig`` in ``opsd/loss.py``, ...); only those that belong to no single module live here.
It is a module of its own rather than part of ``megatron_opsd.config`` because several sections
import Megatron (seconds), which ``load_config``'s other users (``opsd eval``, ``opsd data
preview``) should not pay.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.data.prompts import PromptConfig
from megatron_opsd.data.sources import DataConfig
from megatron_opsd.eval.evaluate import EvalConfig
from megatron_opsd.opsd.loss import LossConfig
from megatron_opsd.opsd.step import StepConfig
from megatron_opsd.opsd.teacher import TeacherConfig
from megatron_opsd.rollout.embedded import EmbeddedEngineConfig
from megatron_opsd.section import Section
from megatron_opsd.tracking import TrackingConfig
from megatron_opsd.train.checkpoint import CheckpointConfig
from megatron_opsd.train.optim import OptimConfig
from megatron_opsd.train.sft import SFTConfig


class ModelConfig(Section):
    hf: str | None = Field(default=None, description="Hugging Face directory: config.json + safetensors weights")
    config: dict[str, Any] | None = Field(
        default=None, description="inline HF config (model_type plus its fields) of a randomly initialized model")
    dtype: Literal["float32", "bfloat16"] = Field(default="float32", description="training parameter dtype")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.hf is None) == (self.config is None):
            raise ValueError("set exactly one of model.hf (a checkpoint directory) and model.config (an inline HF config)")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config needs model_type (e.g. qwen3)")
        return self

    def vocab_size(self) -> int | None:
        """From the inline config or the directory's config.json; None when neither says."""
        if self.config is not None:
            return self.config.get("vocab_size")
        path = Path(self.hf) / "config.json"
        return json.loads(path.read_text()).get("vocab_size") if path.is_file() else None


class ParallelConfig(Section):
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size; data parallel is what the world size leaves")


class RolloutConfig(Section):
    """Sampling of the student's responses (the paper's recipe as defaults) and the engine's weight sync."""

    temperature: float = Field(default=1.1, ge=0, description="sampling temperature of the rollouts; 0: greedy")
    top_p: float = Field(default=0.95, gt=0, le=1, description="nucleus sampling: keep the smallest token set with this total probability")
    top_k: int = Field(default=20, description="<= 0: no top-k truncation")
    max_new_tokens: int = Field(default=1024, ge=1, description="response length limit of a rollout (tokens)")
    stop_tokens: list[str] | None = Field(default=None, description="default: the tokenizer's EOS token")
    sync_interval: int = Field(default=1, ge=1, description="steps between weight syncs into the engine (k)")
    probe_tolerance: float = Field(
        default=1e-2, gt=0, description="max |engine - trainer| log-prob on the probe sequence after a sync "
        "(fp32 agrees to ~1e-5; bf16 needs more)")
    probe_tokens: int = Field(default=64, ge=2, description="length of the probe sequence (a training prompt + its solution)")
    engine: EmbeddedEngineConfig = EmbeddedEngineConfig()


class TrainEvalConfig(EvalConfig):
    """Periodic evaluation with the rollout engine (sampling keys as in ``opsd eval``)."""

    interval: int = Field(default=0, ge=0, description="steps between evaluations; 0: only at the end")
    at_start: bool = Field(default=False, description="also evaluate the starting model (logged at step 0)")
    data: DataConfig | None = Field(default=None, description="held-out problems; None: no evaluation")
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N usable problems")


class TrainConfig(Section):
    """Everything ``opsd train`` reads."""

    algorithm: Literal["opsd", "sft"] = Field(
        default="opsd", description="opsd: on-policy self-distillation; sft: cross-entropy on reference solutions")
    run_dir: str = Field(description="metrics, plot, eval reports, summary.json (and hf/ with export_hf)")
    seed: int = Field(default=1234, description="seed of the model's initialization and of each step's rollouts")
    steps: int = Field(ge=1, description="optimizer steps in the whole run (a resumed run continues to it)")
    prompts_per_step: int = Field(default=32, ge=1, description="problems per step (one rollout each)")
    tokenizer: str = Field(description="tokenizer directory (with a chat template)")
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig
    prompts: PromptConfig = PromptConfig()
    packing: PackingConfig = PackingConfig()
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = Field(description="loss.vocab_size defaults to the model's vocab_size")
    teacher: TeacherConfig = TeacherConfig()
    sft: SFTConfig = SFTConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    step: StepConfig = StepConfig()
    eval: TrainEvalConfig = TrainEvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    export_hf: bool = Field(default=False, description="at the end, write the weights as a Hugging Face directory run_dir/hf")

    @model_validator(mode="before")
    @classmethod
    def _loss_vocab_from_model(cls, tree: Any) -> Any:
        """``loss.vocab_size`` is a property of the model: fill it in unless given."""
        if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
            return tree
        loss = tree.setdefault("loss", {})
        if isinstance(loss, dict) and "vocab_size" not in loss:
            try:
                vocab = ModelConfig.model_validate(tree["model"]).vocab_size()
            except (ValueError, OSError):
                return tree  # the model section's own error is reported
            if vocab is not None:
                loss["vocab_size"] = vocab
        return tree

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        vocab = self.model.vocab_size()
        if vocab is not None and vocab != self.loss.vocab_size:
            raise ValueError(f"loss.vocab_size={self.loss.vocab_size} differs from the model's vocab_size={vocab}")
        if self.checkpoint.interval % self.rollout.sync_interval:
            raise ValueError(
                f"checkpoint.interval={self.checkpoint.interval} must be a multiple of rollout.sync_interval="
                f"{self.rollout.sync_interval}: a resumed run re-syncs the engine, so only then does it replay "
                f"the rollouts of an uninterrupted run")
        return self
