"""Fused OPSD loss vs the naive full-logits loss: time and peak memory of forward + backward.

    python bench/loss.py          # N=4096, H=2048, V=151936, TP=1, 3 repeats

Setting: the paper's v3 loss (forward KL, temperature 1.1, clip 0.05), bf16 hidden states and
output weights as in training, student hidden and weight trainable (full fine-tuning, the case
with the most gradient work; with a frozen output layer, as under the paper's LoRA, the fused loss
needs no weight-gradient buffer at all), loss = token mean. Naive (``naive_token_divergence``):
bf16 logits ``[N, V]`` of both models, fp32 log-softmax, elementwise divergence, clip, sum,
autograd backward -- the standard implementation, written without keeping extra tensors alive.
Fused is run twice: ``weight_grad_fp32=True`` (default; the weight gradient is accumulated over
token chunks in an fp32 ``[V, H]`` buffer, 1.2 GiB here) with chunk_size 256, and
``weight_grad_fp32=False`` (accumulated in bf16) with chunk_size 128, which keeps the chunk
buffers (~0.3 GiB) well under its 0.6 GiB gradient. With the fp32 buffer the peak is set by the
final fp32 -> bf16 gradient cast, so 256-token chunks cost no peak and halve the passes over it.

Training configuration (``*_train`` rows): in training the output weight is a parameter of
Megatron's DistributedDataParallel (``train/optim.py``: ``grad_reduce_in_fp32``), so it has an fp32
``main_grad`` buffer [V, H] (1.2 GiB here) whatever the loss does. Both train rows allocate it,
resident and zeroed (as ``zero_grad_buffer`` leaves it), before the memory baseline, so it counts
as an input for both, and register Megatron's DDP backward hook semantics on the weight
(``main_grad += param.grad; param.grad = None``). The loss is backpropagated as Megatron's schedule
does with ``calculate_per_token_loss``: ``per_token_loss.sum()`` times the loss scale (1.0 in bf16;
the 1 / tokens factor is applied to the grad buffers by ``finalize_model_grads``, the same for
both, outside the timing). ``naive_train``: the naive loss; autograd makes a bf16 [V, H] gradient
that the hook adds to ``main_grad``. ``fused_train``: ``main_grad_scale=1.0``, so the weight gradient
goes into ``main_grad`` and autograd makes none; chunk_size 128 with ``weight_grad_chunks`` 16
(one weight-gradient GEMM per 2048 tokens from their bf16 logit gradients, 0.6 GiB, so the fp32
``main_grad`` is read and written twice instead of 32 times; 8 measured 18.6x less memory but
CPU time at parity).

Memory: each (method, repeat) runs in a fresh process. After the inputs exist, the process resets
its resident-set high-water mark (``/proc/self/clear_refs`` = 5) and reads ``VmHWM`` after
forward + backward; peak = VmHWM - RSS before. RSS counts every page torch's CPU allocator touched
(tensors of this size are mmap-ed and returned to the OS when freed), so the number is the true
peak of extra memory, outputs (gradients) included; tracemalloc would not see torch at all.
Time: wall clock and CPU time (``time.process_time``: user + system seconds of all the process's
threads) of forward + backward in the same process. The host is shared with other jobs, so methods
are interleaved and medians over repeats are reported; wall time then mostly measures the other
tenants (it varied 50-190 s for one method in one run), CPU time measures the work done.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_opsd.algorithms.opsd.divergence import LossConfig
from megatron_opsd.algorithms.opsd.loss import fused_token_divergence

GiB = 2**30


def _rss_high_water() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def naive_token_divergence(hs: torch.Tensor, ht: torch.Tensor, ws: torch.Tensor, wt: torch.Tensor,
                           cfg: LossConfig) -> torch.Tensor:
    """The standard full-logits loss (forward KL with per-entry clip), written lean: nothing kept
    alive that autograd does not need."""
    logp = torch.log_softmax((hs @ ws.T).float() / cfg.temperature, dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax((ht @ wt.T).float() / cfg.temperature, dim=-1)
    return (logq.exp() * (logq - logp)).clamp(max=cfg.clip).sum(dim=-1)


METHODS = ("naive", "fused", "fused_bf16_wgrad", "naive_train", "fused_train")
BASELINE = {"fused": "naive", "fused_bf16_wgrad": "naive", "fused_train": "naive_train"}


def _megatron_ddp_hook(param: torch.Tensor) -> None:
    """What Megatron's DDP backward hook does with a parameter's autograd gradient."""
    if param.grad is not None:
        param.main_grad.add_(param.grad)
    param.grad = None


def worker(method: str, n: int, hidden: int, vocab: int, chunk_size: int, weight_grad_chunks: int) -> dict:
    torch.manual_seed(0)
    # forward KL, T=1.1, clip 0.05
    cfg = LossConfig(vocab_size=vocab, chunk_size=chunk_size, weight_grad_fp32=method != "fused_bf16_wgrad",
                     weight_grad_chunks=weight_grad_chunks)
    train = method.endswith("_train")
    dtype = torch.bfloat16
    hs = torch.randn(n, hidden, dtype=dtype)
    ht = (hs.float() + 0.5 * torch.randn(n, hidden)).to(dtype)
    ws = (0.02 * torch.randn(vocab, hidden)).to(dtype)
    wt = (ws.float() + 0.005 * torch.randn(vocab, hidden)).to(dtype)
    hs.requires_grad_()
    ws = torch.nn.Parameter(ws)
    if train:
        ws.main_grad = torch.zeros(ws.shape, dtype=torch.float32).zero_()  # resident, like DDP's buffer
        ws.register_post_accumulate_grad_hook(_megatron_ddp_hook)
    before = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")
    start, cpu_start = time.perf_counter(), time.process_time()
    if method.startswith("naive"):
        per_token = naive_token_divergence(hs, ht, ws, wt, cfg)
    else:
        per_token = fused_token_divergence(hs, ht, ws, wt, cfg, main_grad_scale=1.0 if train else None)
    loss = per_token.sum() if train else per_token.sum() / n
    loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_bytes": _rss_high_water() - before,
            "loss": per_token.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--chunk-size", type=int, default=256, help="fused with weight_grad_fp32")
    parser.add_argument("--chunk-size-bf16-wgrad", type=int, default=128, help="fused without")
    parser.add_argument("--chunk-size-train", type=int, default=128, help="fused_train")
    parser.add_argument("--weight-grad-chunks-train", type=int, default=16, help="fused_train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunks = {"naive": (args.chunk_size, 1), "fused": (args.chunk_size, 1),
              "fused_bf16_wgrad": (args.chunk_size_bf16_wgrad, 1), "naive_train": (args.chunk_size, 1),
              "fused_train": (args.chunk_size_train, args.weight_grad_chunks_train)}
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.hidden, args.vocab, *chunks[args.worker])))
        return

    n, h, v = args.tokens, args.hidden, args.vocab
    naive_need = 7 * n * v * 4 + 4 * v * h * 2  # rough: ~6 live [N, V] fp32 tensors + weights and grads
    if psutil.virtual_memory().available < naive_need:
        sys.exit(f"need ~{naive_need / GiB:.1f} GiB free for the naive loss, "
                 f"have {psutil.virtual_memory().available / GiB:.1f} GiB")
    print(f"N={n} H={h} V={v} TP=1 bf16, forward KL T=1.1 clip=0.05, chunk_size {args.chunk_size} "
          f"(fused) / {args.chunk_size_bf16_wgrad} (fused_bf16_wgrad) / {args.chunk_size_train} x "
          f"{args.weight_grad_chunks_train} (fused_train), threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}")
    print(f"teacher hidden states [N, H] bf16: {n * h * 2 / 2**20:9.1f} MiB")
    print(f"teacher logits        [N, V] bf16: {n * v * 2 / 2**20:9.1f} MiB ({v / h:.1f}x), "
          f"fp32: {n * v * 4 / 2**20:.1f} MiB ({2 * v / h:.1f}x)")
    runs: dict[str, list[dict]] = {m: [] for m in METHODS if m in args.methods}
    for rep in range(args.repeats):
        for method, results in runs.items():
            cmd = [sys.executable, __file__, "--worker", method, "--tokens", str(n), "--hidden", str(h),
                   "--vocab", str(v), "--chunk-size", str(args.chunk_size),
                   "--chunk-size-bf16-wgrad", str(args.chunk_size_bf16_wgrad),
                   "--chunk-size-train", str(args.chunk_size_train),
                   "--weight-grad-chunks-train", str(args.weight_grad_chunks_train)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"  repeat {rep} {method:16s}: wall {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s  "
                  f"peak {r['peak_bytes'] / GiB:6.2f} GiB  loss {r['loss']:.6f}", flush=True)
    keys = ("seconds", "cpu_seconds", "peak_bytes")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    for m, r in med.items():
        print(f"{m:16s} median: wall {r['seconds']:7.2f} s  cpu {r['cpu_seconds']:7.2f} s  "
              f"peak extra memory {r['peak_bytes'] / GiB:6.2f} GiB")
    for m, base in BASELINE.items():
        if m not in med or base not in med:
            continue
        ratio = {k: med[base][k] / med[m][k] for k in keys}
        print(f"{base}/{m}: wall time {ratio['seconds']:.2f}x, cpu time {ratio['cpu_seconds']:.2f}x (goal >= 1), "
              f"peak memory {ratio['peak_bytes']:.1f}x (goal >= 10)")


if __name__ == "__main__":
    main()
