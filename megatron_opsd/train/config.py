"""The config tree of ``opsd train``: one typed section per component, composed here.

Sections are defined next to the code that reads them (``DataConfig`` in ``data/sources.py``,
``AlgorithmConfig`` in ``algorithms/factory.py``, ...); only those that belong to no single module
live here. It is a module of its own rather than part of ``megatron_opsd.config`` because several
sections import Megatron (seconds), which ``load_config``'s other users (``opsd eval``) should not pay.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from megatron_opsd.algorithms.factory import AlgorithmConfig
from megatron_opsd.data.packing import PackingConfig
from megatron_opsd.data.prompts import PromptConfig
from megatron_opsd.data.sources import DataConfig
from megatron_opsd.eval.evaluate import EvalConfig
from megatron_opsd.models import ModelConfig
from megatron_opsd.rollout.embedded import EmbeddedEngineConfig
from megatron_opsd.rollout.engine import SamplingConfig
from megatron_opsd.rollout.factory import EngineConfig
from megatron_opsd.rollout.sync.base import SyncConfig
from megatron_opsd.section import Section
from megatron_opsd.tracking import TrackingConfig
from megatron_opsd.train.checkpoint import CheckpointConfig
from megatron_opsd.train.optim import OptimConfig
from megatron_opsd.train.step import StepConfig

SYNC_KINDS = {"embedded": ("inprocess",), "recorded": ("none",), "sglang": ("disk", "distributed"), "vllm": ("disk", "distributed")}


class ParallelConfig(Section):
    tp: int = Field(default=1, ge=1, description="tensor-parallel size")
    pp: int = Field(default=1, ge=1, description="pipeline-parallel size; data parallel is what the world size leaves")


class RolloutConfig(SamplingConfig):
    """Sampling of the student's responses (the paper's recipe as defaults), the engine that samples
    them, and how the trainer's weights reach it."""

    engine: EngineConfig = Field(default_factory=EmbeddedEngineConfig, description="the rollout engine, by kind")
    sync: SyncConfig = SyncConfig()
    async_: int = Field(default=0, ge=0, le=1, alias="async", description=(
        "1: generate step t+1's rollouts while step t trains (from the weights one step older; exact on resume "
        "too: they are checkpointed); 0: at the step"))


class TrainEvalConfig(EvalConfig):
    """Periodic evaluation with the rollout engine (sampling keys as in ``opsd eval``)."""

    interval: int = Field(default=0, ge=0, description="steps between evaluations; 0: only at the end")
    at_start: bool = Field(default=False, description="also evaluate the starting model (logged at step 0)")
    data: DataConfig | None = Field(default=None, description="held-out problems; None: no evaluation")
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N usable problems")


class TrainConfig(Section):
    """Everything ``opsd train`` reads."""

    run_dir: str = Field(description="metrics, plot, eval reports, summary.json (and hf/ with export_hf)")
    seed: int = Field(default=1234, description="seed of the model's initialization and of each step's rollouts")
    steps: int = Field(ge=1, description="optimizer steps in the whole run (a resumed run continues to it)")
    prompts_per_step: int = Field(default=32, ge=1, description="problems per step")
    tokenizer: str = Field(description="tokenizer directory (with a chat template)")
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    data: DataConfig
    prompts: PromptConfig = PromptConfig()
    packing: PackingConfig = PackingConfig()
    algorithm: AlgorithmConfig = Field(description="the algorithm (name) and each algorithm's settings")
    rollout: RolloutConfig = RolloutConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    step: StepConfig = StepConfig()
    eval: TrainEvalConfig = TrainEvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    export_hf: bool = Field(default=False, description="at the end, write the weights as a Hugging Face directory run_dir/hf")

    def checkpoint_root(self) -> Path | None:
        """Where the run's own checkpoints go (and are resumed from); None with checkpoints off."""
        if not self.checkpoint.enabled:
            return None
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"

    @model_validator(mode="before")
    @classmethod
    def _loss_vocab_from_model(cls, tree: Any) -> Any:
        """``algorithm.opsd.loss.vocab_size`` is a property of the model: fill it in unless given."""
        if not isinstance(tree, dict):
            return tree
        _refuse_moved_keys(tree)
        if not isinstance(tree.get("model"), dict):
            return tree
        algorithm = tree.setdefault("algorithm", {})
        opsd = algorithm.setdefault("opsd", {}) if isinstance(algorithm, dict) else None
        loss = opsd.setdefault("loss", {}) if isinstance(opsd, dict) else None
        if isinstance(loss, dict) and "vocab_size" not in loss:
            try:
                vocab = ModelConfig.model_validate(tree["model"]).vocab_size()
            except ValueError:
                vocab = 1  # the model section's own error is reported; a stand-in keeps out a second, derived one
            if vocab is not None:
                loss["vocab_size"] = vocab
        return tree

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        vocab, loss = self.model.vocab_size(), self.algorithm.opsd.loss
        if vocab is not None and vocab != loss.vocab_size:
            raise ValueError(f"algorithm.opsd.loss.vocab_size={loss.vocab_size} differs from the model's vocab_size={vocab}")
        if self.algorithm.name in ("opsd", "sft") and self.data.fields.solution is None:
            raise ValueError(f"algorithm.name={self.algorithm.name} trains on reference solutions: data.fields.solution "
                             f"must name them (null is for evaluation and GRPO, which read only answers)")
        engine, sync = self.rollout.engine.kind, self.rollout.sync
        if sync.kind not in SYNC_KINDS[engine]:
            raise ValueError(f"rollout.engine.kind={engine} needs rollout.sync.kind {' or '.join(SYNC_KINDS[engine])}, "
                             f"not {sync.kind}")
        if engine == "vllm" and sync.kind == "distributed":
            transfer = self.rollout.engine.servers.weight_transfer
            if transfer is None:
                raise ValueError("rollout.sync.kind=distributed to vLLM servers needs rollout.engine.servers."
                                 "weight_transfer (nccl on GPUs, gloo on CPUs): the backend they open at start-up")
            if sync.backend not in ("auto", transfer):
                raise ValueError(f"rollout.sync.backend={sync.backend} differs from the servers' "
                                 f"rollout.engine.servers.weight_transfer={transfer}")
        if (engine == "vllm" and self.algorithm.name == "grpo" and self.algorithm.grpo.old == "rollout"
                and self.rollout.temperature > 0 and (self.rollout.top_k != -1 or self.rollout.top_p < 1)):
            raise ValueError("algorithm.grpo.old=rollout takes the sampler's log-probs of the untruncated distribution; "
                             "vLLM reports them only without top-k / top-p: set rollout.top_k=-1 and rollout.top_p=1, "
                             "or grpo.old=current")
        if engine == "recorded" and self.eval.data is not None:
            raise ValueError("evaluation (eval.data) needs an engine that samples from the trainer's weights; "
                             "rollout.engine.kind=recorded replays recorded rollouts")
        if self.checkpoint.enabled and self.checkpoint.interval % sync.interval:
            raise ValueError(
                f"checkpoint.interval={self.checkpoint.interval} must be a multiple of rollout.sync.interval="
                f"{sync.interval}: a resumed run re-syncs the engine, so only then does it replay "
                f"the rollouts of an uninterrupted run")
        return self


# Keys of the layout before the algorithm and sync sections, and where they live now.
_MOVED = {"loss": "algorithm.opsd.loss", "teacher": "algorithm.opsd.teacher", "sft": "algorithm.sft",
          "step.diagnostic_tokens": "algorithm.opsd.diagnostic_tokens", "rollout.sync_interval": "rollout.sync.interval",
          "rollout.probe_tolerance": "rollout.sync.probe_tolerance", "rollout.probe_tokens": "rollout.sync.probe_tokens"}


def _refuse_moved_keys(tree: dict) -> None:
    if isinstance(tree.get("algorithm"), str):
        name = tree["algorithm"]
        raise ValueError(  # noqa: TRY004 - pydantic reports a validator's ValueError, not a TypeError
            f"algorithm is a section now: write 'algorithm: {{name: {name}}}' (algorithm.name={name} on the command line)")
    for old, new in _MOVED.items():
        section, _, key = old.rpartition(".")
        node = tree.get(section) if section else tree
        if isinstance(node, dict) and key in node:
            raise ValueError(f"config key {old!r} moved to {new!r}")


# What a resumed run may change: how long it runs, how it reports and evaluates, where its files
# are (input files may move; the data set's content is fingerprinted), and the parallel layout
# (checkpoints reshard). Any other difference from the checkpoint's config means another run.
RESUMABLE = ("run_dir", "steps", "parallel", "checkpoint", "eval", "tracking", "export_hf", "step", "tokenizer",
             "model.hf", "data.path", "optim.distributed_optimizer", "rollout.engine.max_batch_size",
             # where the fleet runs and how it is reached: a requeued or resubmitted job gets new nodes and ports
             "rollout.engine.urls", "rollout.engine.host", "rollout.engine.router.url", "rollout.engine.router.port",
             "rollout.engine.router.metrics_port", "rollout.engine.servers.base_port", "rollout.engine.timeouts",
             "rollout.engine.concurrency", "rollout.sync.dir", "rollout.sync.address", "rollout.sync.port",
             "model.lora.init_from")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key outside RESUMABLE where the two configs differ."""
    flat_saved, flat_current = _flatten(saved), _flatten(current)
    keys = sorted(set(flat_saved) | set(flat_current))
    return [f"{k}: {flat_saved.get(k, '(unset)')!r} -> {flat_current.get(k, '(unset)')!r}" for k in keys
            if flat_saved.get(k) != flat_current.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE)]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
