"""The SGLang test double's HTTP routes, one router per family, with SGLang 0.5.23's JSON shapes,
status codes and API-key rule (every endpoint but ``/health*`` and ``/metrics*`` wants
``Authorization: Bearer <key>``; the router probes ``/health`` without it): generation
(``/generate`` and the health checks), control (info, loads, pause and continue, flush, abort) and
weights (disk updates, the weight-update group and its buckets, versions)."""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from megatron_opsd.rollout.sglang.double.scheduler import (
    RequestError,
    Scheduler,
    UnknownKeyError,
    WeightsUnchanged,
    pending_samples,
    receive_bucket,
)
from megatron_opsd.rollout.sglang.protocol import HEALTH_GENERATION_ENV

VERSION = "0.5.23-opsd-standin"  # what /server_info and /v1/loads report


def build_app(state: Scheduler, api_key: str | None, tp_size: int = 1) -> FastAPI:
    """The double's application: its three routers behind SGLang's API-key check."""
    app = FastAPI()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        open_path = request.method == "OPTIONS" or request.url.path.startswith(("/health", "/metrics"))  # as SGLang
        if api_key and not open_path and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    for router in (generation_routes(state), control_routes(state, tp_size), weight_routes(state)):
        app.include_router(router)
    return app


def generation_routes(state: Scheduler) -> APIRouter:
    """``/generate`` (single and batch) and SGLang's health checks: ``/health`` runs a one-token
    generation unless ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0``, ``/health_generate`` always."""
    router = APIRouter()
    generation_health = os.environ.get(HEALTH_GENERATION_ENV, "1").lower() in ("1", "true")
    health_timeout_s = float(os.environ.get("SGLANG_HEALTH_CHECK_TIMEOUT", "20"))

    async def generation_check() -> Response:
        start = time.monotonic()
        while time.monotonic() < start + health_timeout_s:
            await asyncio.sleep(1)
            if state.could_generate():
                return Response(status_code=200)
        return Response(status_code=503)

    @router.get("/health")
    async def health() -> Response:
        return await generation_check() if generation_health else Response(status_code=200)

    router.get("/health_generate")(generation_check)

    @router.post("/generate")
    @router.put("/generate")
    async def generate(request: Request) -> Any:
        body = await request.json()
        try:
            items, batch = pending_samples(body, state.engine.vocab_size, state.deterministic)
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

    return router


def control_routes(state: Scheduler, tp_size: int) -> APIRouter:
    """What a server is and serves, its load, pause and continue, flush, abort."""
    router = APIRouter()

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

    for path in ("/model_info", "/get_model_info"):
        router.get(path)(model_info)
    for path in ("/server_info", "/get_server_info"):
        router.get(path)(server_info)

    @router.get("/v1/loads")
    async def loads() -> dict[str, Any]:
        with state.lock:
            running, waiting = len(state.running), len(state.queue)
        return {"timestamp": time.time(), "version": VERSION, "accelerator": "cpu", "num_accelerators": 0,
                "loads": [{"dp_rank": 0, "num_running_reqs": running, "num_waiting_reqs": waiting,
                           "num_used_tokens": 0, "num_total_tokens": state.engine.context_length}]}

    @router.post("/pause_generation")
    async def pause(request: Request) -> dict[str, Any]:
        mode = (await _json(request)).get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            return JSONResponse({"error": {"message": f"unknown pause mode {mode!r}"}}, status_code=400)
        await asyncio.to_thread(state.pause, mode)
        return {"message": "Generation paused successfully.", "status": "ok"}

    @router.post("/continue_generation")
    async def resume() -> dict[str, Any]:
        state.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    @router.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if state.busy():
            return PlainTextResponse("Cache not flushed. Requests are running or waiting.\n", status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details.\n")

    @router.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _json(request)
        state.abort(None if body.get("abort_all") else str(body.get("rid", "")))
        return Response(status_code=200)

    return router


def weight_routes(state: Scheduler) -> APIRouter:
    """Disk updates, the weight-update group (its session and buckets), versions, and the weights
    read back by name."""
    router = APIRouter()

    @router.post("/update_weights_from_disk")
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

    @router.api_route("/get_weights_by_name", methods=["GET", "POST"])
    async def get_weights_by_name(body: dict[str, Any]) -> Any:
        try:
            return state.weights_by_name(str(body["name"]), int(body.get("truncate_size", 100)))
        except RequestError as exc:
            return JSONResponse({"error": {"message": str(exc)}}, status_code=400)

    @router.post("/update_weight_version")
    async def update_weight_version(body: dict[str, Any]) -> dict[str, Any]:
        state.weight_version = str(body["new_version"])
        return {"success": True, "message": f"Weight version updated to {state.weight_version}",
                "new_version": state.weight_version}

    @router.post("/init_weights_update_group")
    def init_weights_update_group(body: dict[str, Any]) -> Any:
        from megatron_opsd.rollout.sglang.weight_group import init_weight_group

        name = body.get("group_name", "weight_update_group")
        backend = "gloo" if not torch.cuda.is_available() else body.get("backend", "nccl")
        try:
            state.groups[name] = init_weight_group(backend, body["master_address"], int(body["master_port"]),
                                                   int(body["world_size"]), int(body["rank_offset"]), name)
        except Exception as exc:  # noqa: BLE001 - the trainer side names what failed
            return _failed(f"Failed to init group: {exc}")
        return _ok("Succeeded to initialize custom process group.")

    @router.post("/destroy_weights_update_group")
    def destroy_weights_update_group(body: dict[str, Any]) -> Any:
        from megatron_opsd.rollout.sglang.weight_group import destroy_weight_group

        group = state.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return _failed("The group to be destroyed does not exist.")
        destroy_weight_group(group)
        return _ok("Succeeded to destroy custom process group.")

    @router.post("/begin_weight_update")
    async def begin_weight_update() -> Any:
        if state.session:
            return _failed("A weight update session is already open")
        state.session = True
        return _ok("Weight update session started.")

    @router.post("/end_weight_update")
    async def end_weight_update() -> Any:
        if not state.session:
            return _failed("No weight update session is open")
        state.session = False
        return _ok("Weight update session ended.")

    @router.post("/update_weights_from_distributed")
    def update_weights_from_distributed(body: dict[str, Any]) -> Any:
        if not state.session:
            return _failed("update_weights_from_distributed needs a session: call /begin_weight_update first")
        group = state.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return _failed(f"Group {body.get('group_name')} not found: call /init_weights_update_group first")
        try:
            tensors = receive_bucket(group, body["names"], body["dtypes"], body["shapes"], body.get("load_format"))
            state.load(iter(tensors), _version(body), partial=True)
        except Exception as exc:  # noqa: BLE001 - partial weights: the trainer must restart this server
            return _failed(f"Failed to update parameter online: {exc}. The full weights of the ModelRunner are "
                           f"partially updated. Please discard the whole weights.")
        return _ok("Succeeded to update parameter online.")

    return router


def _ok(message: str) -> dict[str, Any]:
    return {"success": True, "message": message}


def _failed(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=400)


async def _json(request: Any) -> dict[str, Any]:
    raw = await request.body()
    return (await request.json()) if raw else {}


def _version(body: dict[str, Any]) -> str | None:
    version = body.get("weight_version")
    return None if version is None else str(version)
