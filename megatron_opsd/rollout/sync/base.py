"""The weight-sync contract: its config section, the strategy protocol, and the probe check.

A :class:`WeightSync` owns the whole push of one version: export the weights, hand them to the
engine (pausing it where it has requests in flight), bump its version, then run the probe check.
It is collective: every trainer rank calls :meth:`WeightSync.push`, and the exporter's
communication stays on the trainer's side; engines only ever see HF-named tensors.

Strategies (``rollout.sync.kind``):
- ``inprocess``: the embedded engine in global rank 0's process (``inprocess.py``);
- ``disk``: an HF directory per version on a path the servers share (``disk.py``);
- ``distributed``: broadcast to every server: SGLang's buckets from each pipeline stage
  (``distributed.py``), vLLM's weight-transfer protocol (``vllm_transfer.py``);
- ``none``: the engine's rollouts do not come from the trainer's weights (recorded rollouts).

Probe check: the engine's log-probs of a fixed probe sequence (the first training problem's
prompt and solution) must match the trainer's own Megatron forward within a tolerance; otherwise
:class:`~megatron_opsd.rollout.engine.ProbeMismatchError` stops the run before a wrong weight
mapping can train anything.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.utils import unwrap_model
from pydantic import Field

from megatron_opsd.models.forward import forward_only
from megatron_opsd.models.gpt import attention_mask
from megatron_opsd.models.logprobs import token_logprobs
from megatron_opsd.parallel import broadcast_from_rank0
from megatron_opsd.rollout.engine import ProbeMismatchError, RolloutEngine
from megatron_opsd.section import Section


class SyncConfig(Section):
    kind: Literal["inprocess", "disk", "distributed", "none"] = Field(
        default="inprocess", description="inprocess: the embedded engine in rank 0's process takes the "
        "trainer's weights directly; disk: an HF directory per version that every server loads (rollout.engine.kind sglang); "
        "distributed: broadcast from the trainer to every server (sglang: buckets from each pipeline stage; vllm: its "
        "weight-transfer protocol, rollout.engine.servers.weight_transfer); none: the engine's "
        "rollouts do not depend on the trainer's weights (recorded rollouts)")
    interval: int = Field(default=1, ge=1, description="steps between weight syncs into the engine (k)")
    probe_tolerance: float = Field(
        default=1e-2, gt=0, description="max |engine - trainer| log-prob on the probe sequence after a sync "
        "(fp32 agrees to ~1e-5; bf16 needs more)")
    probe_tokens: int = Field(default=16, ge=2, description="length of the probe sequence (a training prompt + its "
                              "solution) whose log-probs engine and trainer compare after each sync")
    dir: str | None = Field(
        default=None, description="disk: where each version's HF directory is written, a path the servers read "
        "too; distributed: where a version is written to restart a server from; default: run_dir/weights")
    keep_last: int = Field(default=2, ge=1, description="disk: versions kept in dir (older ones are deleted)")
    bucket_mb: float = Field(default=1024, gt=0, description="distributed: size of one broadcast bucket (MiB)")
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="distributed: the weight group's backend; auto: nccl on GPUs, gloo on CPUs (vllm: "
        "the servers' weight_transfer)")
    address: str | None = Field(
        default=None, description="distributed: the address servers reach this node's stage senders at; default: "
        "$OPSD_NODE_ADDRESS (the SLURM launcher sets it per node), 127.0.0.1 for a fleet on 127.0.0.1, else this "
        "host's address")
    port: int | None = Field(
        default=None, ge=1, description="distributed: pipeline stage s's sender listens on port + s; None: free ports")


class WeightSync(Protocol):
    def push(self, version: int) -> dict[str, float]:
        """Bring the trainer's current weights to the engine as ``version`` and check them;
        collective over every trainer rank. Returns the sync's metrics."""

    def close(self) -> None:
        """Finish what the sync still does in the background (at the end of a run)."""


class ProbeCheck:
    """The engine's log-probs of ``ids`` against the trainer's forward (collective over the trainer).

    A short sequence suffices: each position's log-prob already depends on every weight, so a
    weight that arrived wrong, or under the wrong name, moves them all. ``temperature`` is the one the engine reports log-probs at; ``ids`` are cut to a multiple of
    the TP size (sequence parallelism splits the sequence by it).
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], ids: Sequence[int], temperature: float, tolerance: float,
                 vocab_size: int):
        self.chunks = [unwrap_model(c) for c in chunks]
        self.groups = self.chunks[0].groups
        tp = self.groups.tp_size
        self.ids = list(ids)[:len(ids) - len(ids) % tp]
        self.temperature, self.tolerance, self.vocab_size = temperature, tolerance, vocab_size
        device = next(self.chunks[0].parameters()).device
        tokens = torch.tensor([self.ids], device=device)
        self.inputs = {"input_ids": tokens, "position_ids": torch.arange(len(self.ids), device=device)[None],
                       "attention_mask": attention_mask(torch.zeros_like(tokens))}  # built once, on the device

    @torch.no_grad()
    def __call__(self, engine: RolloutEngine | None, version: int) -> float:
        """Max |engine - trainer| log-prob over the probe; raises ProbeMismatchError above the tolerance."""
        ids, temperature = self.ids, self.temperature
        from_engine = broadcast_from_rank0(lambda: engine.logprobs([ids], temperature)[0])
        tokens = self.inputs["input_ids"]
        device = tokens.device
        out = forward_only(self.chunks, [self.inputs], output="hidden")
        worst = torch.zeros((), dtype=torch.float64, device=device)
        if out is not None:
            last = self.chunks[-1]
            hidden = out[0][0]
            if last.config.sequence_parallel:  # this rank's part of the sequence
                hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            trainer = token_logprobs(hidden[:-1], last.output_weight(), tokens[0, 1:], vocab_size=self.vocab_size,
                                     groups=self.groups, temperature=temperature, chunk_size=16).cpu()
            worst.fill_(float((trainer - from_engine).abs().max()))
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if not worst <= self.tolerance:
            raise ProbeMismatchError(
                f"after weight sync {version}, the engine's log-probs of the probe sequence ({len(ids)} tokens) "
                f"differ from the trainer's by up to {float(worst):.3g} > rollout.sync.probe_tolerance="
                f"{self.tolerance}: the weights did not arrive intact (wrong HF name mapping, shape or dtype); "
                f"stopping before training on rollouts of a different model")
        return float(worst)
