"""``opsd serve``: start the CPU test double of an SGLang server (``rollout/sglang/double``).

Its flags are ``sglang.launch_server``'s for what the stand-in supports, so a fleet starts either
with the same command line; the others it accepts and ignores (``--mem-fraction-static``,
``--skip-tokenizer-init``, ``--nccl-port``, ``--base-gpu-id``). The server and its web framework
are imported only when it runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_opsd.errors import UserError


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="a CPU stand-in for an SGLang server (sglang.launch_server's flags)",
                            description=__doc__)
    p.add_argument("--model-path", required=True, help="Hugging Face directory (config.json; weights unless --load-format dummy)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every endpoint")
    p.add_argument("--tp-size", type=int, default=1, help="only 1: the stand-in has no tensor parallelism")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from the config (a weight update brings real ones)")
    p.add_argument("--weight-version", default="default", help="the version reported until a weight update")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    p.add_argument("--max-running-requests", type=int, default=64, help="requests generated together, at most")
    p.add_argument("--enable-deterministic-inference", action="store_true",
                   help="honour each request's sampling_seed (SGLang: only with this flag; 42 when a request names none)")
    p.add_argument("--gather-ms", type=float, default=10.0,
                   help="stand-in only: a batch starts once no request has arrived for this long (or it is full)")
    p.add_argument("--mem-fraction-static", type=float, default=None, help="accepted for compatibility; unused")
    p.add_argument("--skip-tokenizer-init", action="store_true", help="accepted; the stand-in never tokenizes")
    p.add_argument("--nccl-port", type=int, default=None, help="accepted for compatibility; unused (no NCCL)")
    p.add_argument("--base-gpu-id", type=int, default=None, help="accepted for compatibility; unused (CPU)")
    p.add_argument("--log-level", dest="server_log_level", default="warning", help="uvicorn's log level")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
    from megatron_opsd.rollout.sglang.double import Scheduler, build_app

    if args.tp_size != 1:
        raise UserError(f"--tp-size {args.tp_size}: the stand-in serves one process (tp 1) only")
    if not (Path(args.model_path) / "config.json").is_file():
        raise UserError(f"--model-path {args.model_path}: no config.json there")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    cfg = EmbeddedEngineConfig(max_batch_size=args.max_running_requests, dtype=dtype)
    if args.load_format == "dummy":
        from transformers import AutoConfig

        engine = EmbeddedEngine.from_hf_config(AutoConfig.from_pretrained(args.model_path), cfg)
    else:
        engine = EmbeddedEngine.from_pretrained(args.model_path, cfg)
    state = Scheduler(engine, args.model_path, args.weight_version, args.max_running_requests, args.gather_ms / 1000,
                    args.load_format, deterministic=args.enable_deterministic_inference)
    uvicorn.run(build_app(state, args.api_key, args.tp_size), host=args.host, port=args.port,
                log_level=args.server_log_level.lower(), access_log=False)
    return 0
