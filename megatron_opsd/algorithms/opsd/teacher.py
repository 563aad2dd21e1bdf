"""Where the teacher's weights come from: fixed (initial policy), EMA of the student, or live.

OPSD's teacher is the same network as the student, conditioned on the privileged solution. For
``live`` that is literally the current weights (the teacher pass runs under no_grad, so it gets no
gradient). For ``fixed`` and ``ema`` a second parameter set holds the teacher's local shard of
every parameter (this rank's TP/PP slice, the full slice on every DP rank). For the teacher pass
the two sets are *exchanged* in place, parameter by parameter, and exchanged back afterwards: the
model object, its DDP buffers and the optimizer never see different tensors, and the exchange
needs only a small scratch block.

Memory cost per parameter of this rank's shard (on the device, or on the CPU with ``offload``):
- live: 0.
- fixed: one copy in the model's dtype (2 bytes in bf16, 4 in fp32); with LoRA 0: the base with
  the adapters off (``base``). With LoRA every mode's set covers the adapters only.
- ema: as fixed, plus an fp32 accumulator when the model is not fp32 (EMA updates of
  ``1 - decay`` = 1e-3 are below bf16 resolution and would stall); 6 bytes in bf16, 4 in fp32.
With ``offload`` the set sits in pinned host memory (when CUDA is present) and is copied over
PCIe twice per teacher pass; the teacher output-layer shard is brought to the device for the loss.
Every copy to or from it is asynchronous on the current stream and the host never reads it
between them (the EMA update runs on the device, a block at a time), so nothing waits for PCIe
but the kernels that need the data; only a checkpoint's read of the set synchronises first.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
from pydantic import Field

from megatron_opsd.fileio import CheckpointError
from megatron_opsd.models.checkpoint import shadow_sharded_state_dict
from megatron_opsd.section import Section

SWAP_BLOCK = 1 << 20  # elements per step of the exchange of model and teacher weights


class TeacherConfig(Section):
    mode: Literal["fixed", "ema", "live"] = Field(
        default="fixed", description="teacher weights: fixed: the initial ones; ema: a moving average of the "
        "student's; live: the student's current ones")
    ema_decay: float = Field(
        0.999, gt=0.0, lt=1.0, description="ema: teacher <- decay * teacher + (1 - decay) * student after each step")
    offload: bool = Field(
        default=False, description="keep fixed/EMA weights in (pinned) host memory instead of on the device")


class Teacher:
    """Holds the teacher weights for ``params`` (the parameters being trained, in order; the others
    are the teacher's as they are). ``base``: a context in which the model computes its initial
    weights without any copy (LoRA: the adapters off), which a fixed teacher then is."""

    def __init__(self, cfg: TeacherConfig, params: Sequence[torch.nn.Parameter],
                 base: Callable[[], AbstractContextManager] | None = None):
        self.cfg = cfg
        self.params = list(params)
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self.weights: list[torch.Tensor] | None = None
        self.master: list[torch.Tensor] | None = None
        self._base = base if cfg.mode == "fixed" else None
        if cfg.mode == "live" or self._base is not None:
            return
        self.weights = [self._store(p) for p in self.params]
        if cfg.mode == "ema" and any(p.dtype != torch.float32 for p in self.params):
            pinned = cfg.offload and torch.cuda.is_available()
            self.master = [w.float().pin_memory() if pinned else w.float() for w in self.weights]

    def _store(self, p: torch.Tensor) -> torch.Tensor:
        if not self.cfg.offload:
            return p.detach().clone()
        host = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        return host.copy_(p.detach())

    @property
    def _offloaded(self) -> bool:
        """Whether the set lives on the host while the model is on a GPU (copies are asynchronous)."""
        return self.weights is not None and bool(self.params) and self.weights[0].device != self.params[0].device

    @torch.no_grad()
    def _exchange(self) -> None:
        """Swap every parameter with its teacher weights a block at a time through one small scratch
        tensor on the model's device, which stays in cache (a parameter-sized temporary is a fresh
        allocation twice a step, page faults included on CPU). Offloaded: each block goes host ->
        scratch, model -> host, scratch -> model, all queued on the stream without waiting."""
        scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        offloaded = self._offloaded
        for p, w in zip(self.params, self.weights):
            model, teacher = p.detach().view(-1), w.view(-1)
            block = scratch.get((p.dtype, model.device))
            if block is None:
                block = scratch[(p.dtype, model.device)] = torch.empty(SWAP_BLOCK, dtype=p.dtype, device=model.device)
            for s in range(0, model.numel(), SWAP_BLOCK):
                e = min(s + SWAP_BLOCK, model.numel())
                if offloaded:
                    held = block[:e - s].copy_(teacher[s:e], non_blocking=True)
                    teacher[s:e].copy_(model[s:e], non_blocking=True)
                    model[s:e].copy_(held)
                else:
                    held = block[:e - s].copy_(model[s:e])
                    model[s:e].copy_(teacher[s:e])
                    teacher[s:e].copy_(held)

    @contextmanager
    def weights_in_model(self) -> Iterator[None]:
        """Within the block the model computes with the teacher's weights."""
        if self._base is not None:
            with self._base():
                yield
            return
        if self.weights is None:
            yield
            return
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    def weight_of(self, param: torch.Tensor) -> torch.Tensor:
        """The teacher's version of ``param`` on param's device, detached (e.g. the output layer)."""
        index = self._index.get(id(param))
        if self.weights is None or index is None:
            return param.detach()
        return self.weights[index].to(param.device, non_blocking=True)

    @torch.no_grad()
    def update(self) -> None:
        """After each optimizer step: EMA teacher <- decay * teacher + (1 - decay) * student."""
        if self.cfg.mode != "ema":
            return
        alpha = 1.0 - self.cfg.ema_decay
        if self._offloaded:
            self._update_offloaded(alpha)
            return
        targets = self.master if self.master is not None else self.weights
        for p, t in zip(self.params, targets):
            t.lerp_(p.detach().to(t.device, t.dtype), alpha)
        if self.master is not None:
            for w, m in zip(self.weights, self.master):
                w.copy_(m)

    def _update_offloaded(self, alpha: float) -> None:
        """The EMA update of a set in host memory, on the device a block at a time: host -> device,
        lerp, device -> host (the accumulator and the model-dtype copy), all queued without waiting."""
        targets = self.master if self.master is not None else self.weights
        for p, t, w in zip(self.params, targets, self.weights):
            student, target, weights = p.detach().view(-1), t.view(-1), w.view(-1)
            for s in range(0, student.numel(), SWAP_BLOCK):
                e = min(s + SWAP_BLOCK, student.numel())
                block = target[s:e].to(student.device, non_blocking=True).lerp_(student[s:e].to(t.dtype), alpha)
                target[s:e].copy_(block, non_blocking=True)
                if self.master is not None:
                    weights[s:e].copy_(block.to(w.dtype), non_blocking=True)

    def state_tensors(self) -> list[torch.Tensor] | None:
        """The tensors a checkpoint must hold to resume exactly (fp32 accumulator when there is one),
        every queued copy into them finished."""
        self._settle()
        return self.master if self.master is not None else self.weights

    @torch.no_grad()
    def after_load(self) -> None:
        """Refresh the model-dtype copy after ``state_tensors()`` were loaded in place."""
        self._settle()
        if self.master is not None:
            for w, m in zip(self.weights, self.master):
                w.copy_(m)

    def _settle(self) -> None:
        """Wait for the queued copies into an offloaded set (before the host reads or writes it)."""
        if self._offloaded:
            torch.cuda.current_stream().synchronize()


class TeacherState:
    """The teacher's weights as a checkpoint part: the model's sharded tensors re-pointed at the
    teacher's (keys ``teacher.*``), so they reshard across layouts like the model; and its mode."""

    def __init__(self, teacher: Teacher, chunks: Sequence[torch.nn.Module]):
        self.teacher, self.chunks = teacher, chunks

    def _shards(self) -> dict:
        tensors = self.teacher.state_tensors()
        return {} if tensors is None else shadow_sharded_state_dict(self.chunks, self.teacher.params, tensors,
                                                                    prefix="teacher.")

    def sharded_state_dict(self, is_loading: bool = False) -> dict:
        return {"mode": self.teacher.cfg.mode, "weights": self._shards()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.teacher.cfg.mode:
            raise CheckpointError(f"the checkpoint's teacher mode is {state['mode']!r}, the run's {self.teacher.cfg.mode!r}")
        targets = {name: shard.data for name, shard in self._shards().items()}
        for name, value in state["weights"].items():
            if value.data_ptr() != targets[name].data_ptr():  # torch_dist usually loads in place
                targets[name].copy_(value)
        if targets:
            self.teacher.after_load()
