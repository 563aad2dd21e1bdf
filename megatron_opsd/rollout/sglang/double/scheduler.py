"""The SGLang test double's server state: its request queue and batching scheduler over the
embedded engine, pause and abort, and its weights (loads from disk and from a weight-update
group). The HTTP routes over it are ``routes.py``."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.sglang.protocol import (
    GREEDY_BELOW,
    SAMPLING_KEYS,
    bucket_nbytes,
    finish_reason,
    generate_reply,
    unflatten_bucket,
)

DEFAULT_SEED = 42  # SGLang's sampling_seed for a request without one under --enable-deterministic-inference


class RequestError(ValueError):
    """A request SGLang answers with 400."""


class WeightsUnchanged(ValueError):
    """A weight update refused before it changed anything."""


class UnknownKeyError(RequestError):
    """A sampling_params key SGLang does not know."""


@dataclass
class Pending:
    """One sample waiting for, or in, a batch."""

    rid: str
    input_ids: list[int]
    params: SamplingParams
    seed: int
    input_logprobs: bool
    done: threading.Event = field(default_factory=threading.Event)
    start: float = field(default_factory=time.monotonic)
    reply: dict[str, Any] | None = None
    aborted: bool = False


def _sampling(raw: Any, deterministic: bool) -> tuple[SamplingParams, int]:
    """SGLang's sampling_params -> (params, seed); 400 for unknown keys or invalid values. The seed
    is the request's only when ``deterministic`` (``--enable-deterministic-inference``)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - SAMPLING_KEYS)
    if unknown:
        raise UnknownKeyError(f"unknown field `{unknown[0]}`, expected one of {', '.join(sorted(SAMPLING_KEYS))}")
    temperature = float(raw.get("temperature", 1.0))
    top_k = int(raw.get("top_k", -1))
    if temperature < GREEDY_BELOW:
        temperature, top_k = 0.0, 1
    if int(raw.get("n", 1)) != 1:
        raise RequestError("the stand-in takes n=1 per request (send one request per sample)")
    try:
        params = SamplingParams(temperature=temperature, top_p=float(raw.get("top_p", 1.0)), top_k=top_k,
                                max_new_tokens=int(raw.get("max_new_tokens", 128)),
                                stop_token_ids=tuple(int(t) for t in raw.get("stop_token_ids") or ()))
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    if not deterministic:
        return params, int(torch.randint(0, 2 ** 62, ()).item())
    seed = raw.get("sampling_seed")
    return params, int(seed) if seed is not None else DEFAULT_SEED


class Scheduler:
    """The server's state: the engine, the queue, pause, weight version, weight-update groups."""

    def __init__(self, engine: Any, model_path: str, weight_version: str, max_batch_size: int, gather_s: float = 0.0,
                 load_format: str = "auto", deterministic: bool = False):
        self.engine, self.model_path, self.max_batch_size = engine, model_path, max_batch_size
        self.gather_s, self.deterministic = gather_s, deterministic
        self.load_format = load_format  # --load-format: what a disk update without one loads with
        self.weight_version = weight_version
        self.lock = threading.Condition()  # guards the queue, the running batch and pause
        self.queue: list[Pending] = []
        self.running: list[Pending] = []
        self.paused: str | None = None  # the pause mode
        self.interrupt = threading.Event()  # stops the running batch
        self.model_lock = threading.Lock()  # generation or a weight update, not both
        self.groups: dict[str, Any] = {}
        self.session = False  # between /begin_weight_update and /end_weight_update
        self.loading = False  # a weight update holds the scheduler
        threading.Thread(target=self._schedule, name="scheduler", daemon=True).start()

    # -- generation ------------------------------------------------------------------------------

    def submit(self, items: list[Pending]) -> bool:
        """Queue ``items``, unless generation is paused (False: a paused server holds them at the door)."""
        with self.lock:
            if self.paused:
                return False
            self.queue.extend(items)
            self.lock.notify_all()
            return True

    def _next_batch(self) -> list[Pending]:
        with self.lock:
            while not self._ready():
                self.lock.wait()
            first = self.queue[0]
            batch = [p for p in self.queue if p.params == first.params and p.input_logprobs == first.input_logprobs]
            batch = batch[:self.max_batch_size]
            self.queue = [p for p in self.queue if p not in batch]
            self.running = batch
            self.interrupt.clear()
            return batch

    def _ready(self) -> bool:
        """(Lock held.) Whether a batch may start: not paused, requests queued, and either a full
        batch of them or none new for ``gather_s``. A step's requests arrive a few milliseconds
        apart; SGLang adds each to its running batch at the next decode step, but the embedded
        engine's batch is fixed once started, so the stand-in gathers them first."""
        while not self.paused and self.queue:
            if len(self.queue) >= self.max_batch_size or not self.lock.wait(self.gather_s):
                return True
        return False

    def _schedule(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                with self.model_lock:
                    rollouts = self.engine.generate_sequences([p.input_ids for p in batch], batch[0].params,
                                                              [p.seed for p in batch], self.interrupt)
                    inputs = self.engine.logprobs([p.input_ids for p in batch], 1.0) \
                        if batch[0].input_logprobs else [None] * len(batch)
                    version = self.weight_version
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                rollouts, inputs, version, failure = None, None, self.weight_version, exc
            else:
                failure = None
            with self.lock:
                for k, p in enumerate(batch):
                    if failure is not None:
                        p.reply = {"error": {"message": f"{type(failure).__name__}: {failure}"}}
                    elif rollouts[k].finish_reason == "abort" and not p.aborted:
                        continue  # cut short by a retract pause or another request's abort: queued again
                    else:
                        r = rollouts[k]
                        reason = "abort" if p.aborted else r.finish_reason
                        stop = r.response_ids[-1] if reason == "stop" else None
                        lp = [None, *inputs[k].tolist()] if inputs[k] is not None else None
                        p.reply = generate_reply(p.rid, p.input_ids, r.response_ids, r.logprobs,
                                                 finish_reason(reason, stop, p.params.max_new_tokens, "Abort request"),
                                                 version, lp, time.monotonic() - p.start)
                    p.done.set()
                self.queue[:0] = [p for p in batch if not p.done.is_set()]  # a restart: same seed, same rollout
                self.running = []
                self.lock.notify_all()

    def abort(self, rid_prefix: str | None) -> None:
        """Abort queued and running requests whose rid starts with ``rid_prefix`` (None: all)."""
        with self.lock:
            for p in [*self.queue, *self.running]:
                if rid_prefix is None or p.rid.startswith(rid_prefix):
                    p.aborted = True
            for p in [q for q in self.queue if q.aborted]:
                p.reply = generate_reply(p.rid, p.input_ids, [], [], finish_reason("abort", None, 0, "Abort request"),
                                         self.weight_version)
                p.done.set()
            self.queue = [q for q in self.queue if not q.aborted]
            if any(p.aborted for p in self.running):
                self.interrupt.set()

    def pause(self, mode: str) -> None:
        """Stop generating; returns once no batch runs. ``abort``: every request ends now (aborted);
        ``retract``: running requests go back to the queue; ``in_place``: the running batch finishes."""
        with self.lock:
            self.paused = mode
        if mode == "abort":
            self.abort(None)
        elif mode == "retract":
            self.interrupt.set()
        with self.lock:
            while self.running:
                self.lock.wait(0.05)

    def resume(self) -> None:
        with self.lock:
            self.paused = None
            self.lock.notify_all()

    def busy(self) -> bool:
        with self.lock:
            return bool(self.running) or (bool(self.queue) and self.paused != "retract")

    def could_generate(self) -> bool:
        """Whether a one-token generation would be served now (what SGLang's health check asks)."""
        return not self.paused and not self.loading

    # -- weights ---------------------------------------------------------------------------------

    def load(self, tensors: Iterator[tuple[str, torch.Tensor]], version: str | None, *, partial: bool = False) -> None:
        """Load HF-named tensors between batches. A load that fails leaves the weights partly
        updated, as SGLang does, and the engine refuses to generate until a complete load succeeds.
        ``partial``: a bucket of ``/update_weights_from_distributed``."""
        with self.model_lock:
            self.loading = True
            try:
                self.engine.update_weights(tensors, self.engine.weight_version, partial=partial)
            finally:
                self.loading = False
            if version is not None:
                self.weight_version = version

    def load_from_disk(self, path: Path, version: str | None) -> None:
        """``/update_weights_from_disk``. The directory's names and shapes (its safetensors headers)
        are checked before a tensor is copied, so one that does not fit the model leaves the served
        weights as they were (:class:`WeightsUnchanged`): what SGLang achieves by loading the
        previous weights again, without holding a second copy of the model."""
        problems = self.engine.weight_errors(_safetensors_shapes(path))
        if problems:
            raise WeightsUnchanged(f"{path} does not fit the model:\n  " + "\n  ".join(problems))
        self.load(_safetensors(path), version)

    def weights_by_name(self, name: str, truncate_size: int) -> list[float]:
        """The first ``truncate_size`` values of parameter ``name`` (SGLang's ``/get_weights_by_name``)."""
        param = dict(self.engine.model.named_parameters()).get(name)
        if param is None:
            raise RequestError(f"no parameter {name!r}")
        with self.model_lock:
            return param.detach().reshape(-1)[:truncate_size].float().tolist()


def _safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WeightsUnchanged(f"no *.safetensors in {path}")
    return files


def _safetensors_shapes(path: Path) -> Iterator[tuple[str, list[int]]]:
    from safetensors import safe_open

    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
                yield name, handle.get_slice(name).get_shape()


def _safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not iterable
                yield name, handle.get_tensor(name)


def pending_samples(body: dict[str, Any], vocab_size: int, deterministic: bool) -> tuple[list[Pending], bool]:
    """The samples of a /generate body, and whether it was a batch."""
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids:
        raise RequestError("input_ids (a list of token ids, or a list of such lists) is required")
    batch = isinstance(ids[0], list)
    prompts = ids if batch else [ids]
    rids = body.get("rid")
    if isinstance(rids, list):
        if len(rids) != len(prompts):
            raise RequestError(f"{len(rids)} rids for {len(prompts)} prompts")
    else:
        base = str(rids) if rids is not None else f"standin-{time.monotonic_ns()}"
        rids = [f"{base}_{i}" if batch else base for i in range(len(prompts))]
    if len(set(rids)) != len(rids):
        raise RequestError("Duplicate request ids in a batch")
    params, seed = _sampling(body.get("sampling_params"), deterministic)
    wants_inputs = body.get("logprob_start_len", -1) == 0 and bool(body.get("return_logprob"))
    items = []
    for rid, prompt in zip(rids, prompts):
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
            raise RequestError(f"rid {rid}: input_ids outside the vocabulary [0, {vocab_size})")
        items.append(Pending(rid, prompt, params, seed, wants_inputs))
    return items, batch


def receive_bucket(group: Any, names: list[str], dtypes: list[str], shapes: list[list[int]],
             load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """The tensors the trainer broadcasts over ``group`` (from its rank 0), as SGLang receives them:
    one buffer per bucket (``flattened_bucket``) or one broadcast per tensor."""
    import torch.distributed as dist

    if len({len(names), len(dtypes), len(shapes)}) != 1:
        raise ValueError(f"{len(names)} names, {len(dtypes)} dtypes and {len(shapes)} shapes")
    if load_format == "flattened_bucket":
        buffer = torch.empty(bucket_nbytes(dtypes, shapes), dtype=torch.uint8)
        dist.broadcast(buffer, group_src=0, group=group)
        return list(zip(names, unflatten_bucket(buffer, dtypes, shapes), strict=True))
    tensors = [torch.empty(shape, dtype=getattr(torch, dtype)) for dtype, shape in zip(dtypes, shapes, strict=True)]
    for t in tensors:
        dist.broadcast(t, group_src=0, group=group)
    return list(zip(names, tensors, strict=True))
