"""The CPU stand-in for an SGLang 0.5.23 server (``opsd serve``), backed by the embedded engine.

It speaks the subset of SGLang's HTTP API the product uses, with SGLang's JSON shapes, status codes
and blocking behaviour (``rollout/sglang/protocol.py`` and the notes behind it): ``/generate``
(single and batch; blocks while paused; an aborted request is a 200 with its partial tokens and
finish reason ``abort``; an unknown ``sampling_params`` key is a 400), ``/pause_generation``
(``abort``: nothing runs when it returns; ``retract``: running requests go back to the queue and
start again after ``/continue_generation``; ``in_place``: the running batch finishes, nothing new
starts), ``/flush_cache`` (400 while requests run or wait), ``/abort_request`` (by rid prefix),
``/v1/loads``, ``/model_info``, ``/server_info``, ``/update_weights_from_disk`` (a directory
that does not fit leaves the weights as they were; without a ``load_format`` it loads with the
server's ``--load-format``, so a server started with ``dummy`` refuses, as SGLang's does),
``/update_weight_version``, and the
weight-update group: ``/init_weights_update_group``, ``/begin_weight_update``,
``/update_weights_from_distributed`` (``flattened_bucket`` too), ``/end_weight_update``,
``/destroy_weights_update_group``. ``weight_version`` is in
``/model_info`` and every reply's ``meta_info``. With ``--api-key`` every endpoint but
``/health*`` and ``/metrics*`` wants ``Authorization: Bearer <key>`` (401 otherwise), as in SGLang,
whose router probes ``/health`` without the key.

Its flags are ``sglang.launch_server``'s for what it supports, so a fleet starts either with the
same command line. Requests are batched (same sampling settings, up to ``--max-running-requests``).
As in SGLang, a request's ``sampling_seed`` is honoured only with ``--enable-deterministic-inference``
(42 when a request names none); then each is sampled with its own seed, as the embedded engine samples
a seeded sequence, so a fleet of stand-ins gives the rollouts of the embedded engine. Without the
flag every request samples from a fresh seed. Input log-probs (``logprob_start_len=0``) are the raw
logits' ``log_softmax`` whatever the request's temperature, as SGLang's are; sampled tokens'
log-probs are at the request's temperature. ``/health`` runs SGLang's check: unless
``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0``, it answers 200 once the scheduler could serve a
one-token generation, checked every second, and 503 after ``SGLANG_HEALTH_CHECK_TIMEOUT`` (20 s)
without (paused, or loading weights); ``/health_generate`` always does so. What it does not model:
SGLang's radix cache and memory limits, streaming, text prompts (``--skip-tokenizer-init``
behaviour only), tensor parallelism beyond 1 (``--tp-size`` must be 1), and ``in_place``
freezing a running batch mid-way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.sglang.protocol import (
    GREEDY_BELOW,
    HEALTH_GENERATION_ENV,
    SAMPLING_KEYS,
    bucket_nbytes,
    finish_reason,
    generate_reply,
    unflatten_bucket,
)

log = logging.getLogger(__name__)
VERSION = "0.5.23-opsd-standin"
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


class StandIn:
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


def build_app(state: StandIn, api_key: str | None, tp_size: int = 1) -> FastAPI:
    """The FastAPI application of the stand-in."""
    app = FastAPI()
    generation_health = os.environ.get(HEALTH_GENERATION_ENV, "1").lower() in ("1", "true")
    health_timeout_s = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        open_path = request.method == "OPTIONS" or request.url.path.startswith(("/health", "/metrics"))  # as SGLang
        if api_key and not open_path and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    def ok(message: str) -> dict[str, Any]:
        return {"success": True, "message": message}

    def failed(message: str) -> JSONResponse:
        return JSONResponse({"success": False, "message": message}, status_code=400)

    async def generation_check() -> Response:
        start = time.monotonic()
        while time.monotonic() < start + health_timeout_s:
            await asyncio.sleep(1)
            if state.could_generate():
                return Response(status_code=200)
        return Response(status_code=503)

    @app.get("/health")
    async def health() -> Response:
        return await generation_check() if generation_health else Response(status_code=200)

    app.get("/health_generate")(generation_check)

    def model_info() -> dict[str, Any]:
        cfg = state.engine.model.config
        return {"model_path": state.model_path, "tokenizer_path": state.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": state.weight_version,
                "has_image_understanding": False, "has_audio_understanding": False, "model_type": cfg.model_type,
                "architectures": getattr(cfg, "architectures", None), "served_model_name": state.model_path}

    def server_info() -> dict[str, Any]:
        return {"model_path": state.model_path, "served_model_name": state.model_path, "tp_size": tp_size,
                "dp_size": 1, "version": VERSION, "max_total_tokens": state.engine.context_length,
                "internal_states": [{"weight_version": state.weight_version}]}

    app.get("/model_info")(model_info)
    app.get("/get_model_info")(model_info)
    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    @app.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        with state.lock:
            running, waiting = len(state.running), len(state.queue)
        return {"timestamp": time.time(), "version": VERSION, "accelerator": "cpu", "num_accelerators": 0,
                "loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                           "num_used_tokens": 0, "num_total_tokens": state.engine.context_length}]}

    @app.post("/generate")
    @app.put("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        try:
            items, batch = _pending(body, state.engine.vocab_size, state.deterministic)
        except UnknownKeyError as exc:  # 0.5.23's contract gate answers with a plain string
            return JSONResponse({"error": str(exc)}, status_code=400)
        except RequestError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)
        while not state.submit(items):
            await asyncio.sleep(0.02)
        for p in items:
            await asyncio.to_thread(p.done.wait)
        if any("error" in p.reply for p in items):
            return JSONResponse(next(p.reply for p in items if "error" in p.reply), status_code=500)
        replies = [p.reply for p in items]
        return replies if batch else replies[0]

    @app.post("/pause_generation")
    async def pause(request: Request) -> dict[str, Any]:
        mode = (await _json(request)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return JSONResponse({"error": {"message": f"unknown pause mode {mode!r}"}}, status_code=400)
        await asyncio.to_thread(state.pause, mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def resume() -> dict[str, Any]:
        state.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if state.busy():
            return PlainTextResponse("Cache not flushed. Requests are running or waiting.\n", status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _json(request)
        state.abort(None if body.get("abort_all") else str(body.get("rid", "")))
        return Response(status_code=200)

    @app.post("/update_weights_from_disk")
    def update_weights_from_disk(body: dict[str, Any]) -> Any:
        if body.get("abort_all_requests"):
            state.abort(None)
        if (body.get("load_format") or state.load_format) == "dummy":  # SGLang defaults it to --load-format
            return JSONResponse({"success": False, "message": "Failed to get model loader: <DummyModelLoader>.",
                                 "num_paused_requests": 0}, status_code=400)
        try:
            state.load_from_disk(Path(body["model_path"]), _version(body))
        except WeightsUnchanged as exc:  # reported as SGLang reports a load it rolled back
            return JSONResponse({"success": False, "message": f"Failed to update weights: {exc}.\nRolling back to "
                                 f"original weights.", "num_paused_requests": 0}, status_code=400)
        except Exception as exc:  # noqa: BLE001 - reported; the server refuses to generate until a load succeeds
            return JSONResponse({"success": False, "message": f"Failed to update weights: {exc}. The weights are "
                                 f"partly updated.", "num_paused_requests": 0}, status_code=400)
        state.model_path = body["model_path"]
        return {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    @app.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(body: dict[str, Any]) -> Any:
        try:
            return state.weights_by_name(str(body["name"]), int(body.get("truncate_size", 100)))
        except RequestError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)

    @app.post("/update_weight_version")
    async def update_weight_version(body: dict[str, Any]) -> dict[str, Any]:
        state.weight_version = str(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {state.weight_version}",
                "new_version": state.weight_version}

    @app.post("/init_weights_update_group")
    def init_weights_update_group(body: dict[str, Any]) -> Any:
        from megatron_opsd.rollout.sglang.weight_group import init_weight_group

        name = body.get("group_name", "weight_update_group")
        backend = "gloo" if not torch.cuda.is_available() else body.get("backend", "nccl")
        try:
            state.groups[name] = init_weight_group(backend, body["master_address"], int(body["master_port"]),
                                                   int(body["world_size"]), int(body["rank_offset"]), name)
        except Exception as exc:  # noqa: BLE001 - the trainer side names what failed
            return failed(f"Failed to init group: {exc}")
        return ok("Succeeded to initialize custom process group.")

    @app.post("/destroy_weights_update_group")
    def destroy_weights_update_group(body: dict[str, Any]) -> Any:
        from megatron_opsd.rollout.sglang.weight_group import destroy_weight_group

        group = state.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return failed("The group to be destroyed does not exist.")
        destroy_weight_group(group)
        return ok("Succeeded to destroy custom process group.")

    @app.post("/begin_weight_update")
    async def begin_weight_update() -> Any:
        if state.session:
            return failed("A weight update session is already open")
        state.session = True
        return ok("Weight update session started.")

    @app.post("/end_weight_update")
    async def end_weight_update() -> Any:
        if not state.session:
            return failed("No weight update session is open")
        state.session = False
        return ok("Weight update session ended.")

    @app.post("/update_weights_from_distributed")
    def update_weights_from_distributed(body: dict[str, Any]) -> Any:
        if not state.session:
            return failed("update_weights_from_distributed needs a session: call /begin_weight_update first")
        group = state.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return failed(f"Group {body.get('group_name')} not found: call /init_weights_update_group first")
        try:
            tensors = _receive(group, body["names"], body["dtypes"], body["shapes"], body.get("load_format"))
            state.load(iter(tensors), _version(body), partial=True)
        except Exception as exc:  # noqa: BLE001 - partial weights: the trainer must restart this server
            return failed(f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                          f"partially updated. Please discard the whole weights.")
        return ok("Succeeded to update parameter online.")

    return app


async def _json(request: Any) -> dict[str, Any]:
    raw = await request.body()
    return (await request.json()) if raw else {}


def _version(body: dict[str, Any]) -> str | None:
    version = body.get("weight_version")
    return None if version is None else str(version)


def _pending(body: dict[str, Any], vocab_size: int, deterministic: bool) -> tuple[list[Pending], bool]:
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


def _receive(group: Any, names: list[str], dtypes: list[str], shapes: list[list[int]],
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
