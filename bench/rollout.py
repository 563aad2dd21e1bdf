"""What the HTTP path costs: the same rollouts through sglang-router + two ``opsd serve`` stand-ins
against the embedded engine in this process (goal: <= 15% slower at 8 prompts x 256 tokens); and
through the router and one stand-in with every core, which isolates the HTTP path's own cost.

Both sample the same sequences with the same per-sample seeds (checked: identical tokens), on the
same CPU cores: the embedded engine with every core in one process, each stand-in with its share.
Every response is exactly ``--tokens`` long (no stop token), so both do the same work. With
``--vllm PYTHON`` (a vLLM environment's interpreter: ``make vllm-env``) the same rollouts go through
one and two real vLLM servers too (eager mode; the same token counts, not the same tokens: vLLM
has its own sampler).

    python bench/rollout.py [--prompts 8] [--tokens 256] [--repeats 3] [--hidden 256] [--layers 4] [--vllm PYTHON]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Qwen3Config, Qwen3ForCausalLM

from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import SamplingParams
from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
from megatron_opsd.rollout.sglang.engine import SGLangEngine
from megatron_opsd.rollout.sglang.fleet import Fleet
from megatron_opsd.rollout.vllm.config import VLLMEngineConfig
from megatron_opsd.rollout.vllm.engine import VLLMEngine, VLLMFleet

REPO = Path(__file__).resolve().parents[1]


def model_dir(root: Path, hidden: int, layers: int, vocab: int) -> Path:
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=True,
                         max_position_embeddings=1024, architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(root / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # vLLM's completions detokenize
        shutil.copy(REPO / "data" / "tokenizer" / name, root / "model" / name)
    return root / "model"


def timed(generate, repeats: int) -> tuple[float, list]:
    """Median seconds of ``repeats`` calls (after one warm-up call), and the last result."""
    result = generate()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = generate()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--vllm", default=None, help="also through vLLM servers run by this interpreter")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp), args.hidden, args.layers, args.vocab)
        prompts = [torch.randint(args.vocab, (32 + 8 * i,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(args.prompts)]
        params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=args.tokens, stop_token_ids=(),
                                seed=7)
        torch.set_num_threads(cores)
        embedded = EmbeddedEngine.from_pretrained(path, EmbeddedEngineConfig(max_batch_size=args.prompts))
        local_s, local = timed(lambda: embedded.generate(prompts, params), args.repeats)

        fleets = {}
        for count in (1, 2):  # one server with every core (the HTTP path alone), two with half each
            os.environ["OMP_NUM_THREADS"] = str(max(1, cores // count))
            fleets[count] = fleet_time(path, prompts, params, count, args)
        vllm = {count: vllm_time(path, prompts, params, count, args, cores) for count in (1, 2)} if args.vllm else {}
    local_ids = [[r.response_ids for r in g] for g in local]
    same = all(local_ids == [[r.response_ids for r in g] for g in remote] for _, remote in fleets.values())
    tokens = args.prompts * args.tokens
    print(f"rollouts: {args.prompts} prompts x {args.tokens} tokens, Qwen3 hidden {args.hidden} x {args.layers} layers, "
          f"vocab {args.vocab}, {cores} cores; identical tokens: {same}")
    print(f"  {f'embedded engine, this process, {cores} threads':<44}  {local_s:7.2f} s  {tokens / local_s:8.0f} tokens/s")
    for count, (seconds, _) in fleets.items():
        label = f"router + {count} stand-in(s), {max(1, cores // count)} thread(s) each"
        print(f"  {label:<44}  {seconds:7.2f} s  {tokens / seconds:8.0f} tokens/s  ratio {seconds / local_s:.3f}")
    for count, seconds in vllm.items():
        label = f"{count} vLLM server(s), {max(1, cores // count)} thread(s) each"
        print(f"  {label:<44}  {seconds:7.2f} s  {tokens / seconds:8.0f} tokens/s  ratio {seconds / local_s:.3f}")
    print(f"  HTTP path (2 stand-ins) / embedded time: {fleets[2][0] / local_s:.3f} (goal <= 1.15)")
    if not same:
        raise SystemExit("the paths sampled different tokens: the comparison is not of the same work")


def fleet_time(path: Path, prompts: list[list[int]], params: SamplingParams, count: int,
               args: argparse.Namespace) -> tuple[float, list]:
    """Median seconds of the rollouts through the router and ``count`` stand-ins, and the rollouts."""
    cfg = SGLangEngineConfig.model_validate({
        "kind": "sglang", "servers": {"count": count, "command": ["python", "-m", "megatron_opsd.cli", "serve"],
                                      "deterministic_inference": True,
                                      "args": ["--max-running-requests", str(args.prompts)]},
        "timeouts": {"startup_s": 300, "request_s": 600, "control_s": 300}})
    fleet = Fleet(cfg, path.parent / f"logs{count}", api_key="bench")
    fleet.start(str(path), version=0)
    engine = SGLangEngine(fleet, cfg, args.vocab, run_id="bench")
    try:
        return timed(lambda: engine.generate(prompts, params), args.repeats)
    finally:
        engine.close()


def vllm_time(path: Path, prompts: list[list[int]], params: SamplingParams, count: int, args: argparse.Namespace,
              cores: int) -> float:
    """Median seconds of the rollouts through ``count`` vLLM servers (threads unpinned, each its share
    of the cores); every response checked to be ``--tokens`` long."""
    threads = str(max(1, cores // count))
    cfg = VLLMEngineConfig.model_validate({
        "kind": "vllm", "servers": {"count": count, "command": [args.vllm, "-m", "vllm.entrypoints.openai.api_server"],
                                    "args": ["--enforce-eager"], "env": {
                                        "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                        "OMP_NUM_THREADS": threads}},
        "timeouts": {"startup_s": 600, "request_s": 600, "control_s": 300}})
    fleet = VLLMFleet(cfg, path.parent / f"vllm_logs{count}", api_key="bench")
    try:
        fleet.start(str(path), version=0)
        engine = VLLMEngine(fleet, cfg, args.vocab, run_id="bench")
        seconds, rollouts = timed(lambda: engine.generate(prompts, params), args.repeats)
    finally:
        fleet.stop()
    if any(len(r.response_ids) != args.tokens for g in rollouts for r in g):
        raise SystemExit("a vLLM response is not --tokens long: the comparison is not of the same work")
    return seconds


if __name__ == "__main__":
    main()
