"""What runs on CUDA beyond model parity (tests/test_models_gpu.py): the fused loss against
float64, an OPSD run with the embedded engine on the trainer's GPU, LoRA against PEFT (also under
Transformer Engine's fused norm-linear contract), attention's kernel choice and packed-attention
memory, the student step's model FLOP/s against a measured bf16 matmul peak, the offloaded
teacher, and a weight broadcast from CUDA tensors over gloo into a stand-in server. Each records
its numbers (``record_property``) for tools/gpu_check.sh's table; all are skipped without CUDA."""
from __future__ import annotations

import math
import time

import peft
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_opsd.algorithms.opsd.divergence import LossConfig, dense_token_divergence
from megatron_opsd.algorithms.opsd.loss import fused_token_divergence
from megatron_opsd.algorithms.opsd.teacher import SWAP_BLOCK, Teacher, TeacherConfig
from megatron_opsd.models import build_model, load_hf_config, parse_hf_config
from megatron_opsd.models.bridge import load_hf_weights
from megatron_opsd.models.gpt import attention_mask
from megatron_opsd.models.lora import HF_MODULES, LoraConfig, add_adapters
from megatron_opsd.models.peft_format import load_peft_adapters
from megatron_opsd.parallel import Layout, initialize
from megatron_opsd.tracking import read_metrics
from megatron_opsd.train.components import build_components
from megatron_opsd.train.loop import train
from tests.support.te_contract import fused_norm_spec
from tests.support.tiny_models import save_tiny_model
from tests.support.train_configs import REPO, load_train, write_config
from tests.workers.loss_tp import Case, dense_reference, fused, relative_error

pytestmark = pytest.mark.gpu
QWEN3_0P6B = REPO / "examples/models/qwen3_0p6b"


@pytest.fixture
def groups():
    """A world of one with Megatron's groups, made anew for each test (a training run tears them down)."""
    return initialize(Layout())


def _seconds(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn`` on the GPU after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def test_fused_loss_on_cuda_matches_float64(record_property):
    """Qwen's 151,936-token vocabulary (+ padding rows), clipped forward KL, on the GPU's own chunk
    size: fp32 against dense float64, bf16 inputs against float64 on the same rounded values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, hidden, vocab = 1000, 512, 151936
    rows = vocab + 128

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64)

    hs, ws = randn(n, hidden), randn(rows, hidden) * 2 / math.sqrt(hidden)
    case = Case(LossConfig(vocab_size=vocab, temperature=1.1, clip=0.05), hs, hs + 0.7 * randn(n, hidden),
                ws, ws + 0.7 * randn(rows, hidden) / math.sqrt(hidden), None,
                torch.full((n,), 1.0 / n, device="cuda", dtype=torch.float64))
    assert case.cfg.chunk_rows(hs.device) >= n  # one chunk: the GPU default
    reference = dense_reference(case)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        if dtype == torch.bfloat16:
            for name in ("student_hidden", "teacher_hidden", "student_weight", "teacher_weight"):
                setattr(case, name, getattr(case, name).bfloat16().double())
            reference = dense_reference(case)
        got = fused(case, dtype)[:3]
        errors = [relative_error(a, e) for a, e in zip(got, reference)]
        record_property(f"{str(dtype).removeprefix('torch.')}_rel_err", f"{max(errors):.1e}")
        assert max(errors) <= tolerance, (dtype, errors)
    fp32 = [t.float() for t in (case.student_hidden, case.teacher_hidden, case.student_weight, case.teacher_weight)]

    def fused_pass() -> None:
        h, w = fp32[0].clone().requires_grad_(), fp32[2].clone().requires_grad_()
        fused_token_divergence(h, fp32[1], w, fp32[3], case.cfg).mean().backward()

    def dense_pass() -> None:
        h, w = fp32[0].clone().requires_grad_(), fp32[2].clone().requires_grad_()
        dense_token_divergence(h @ w.T, fp32[1] @ fp32[3].T, case.cfg).mean().backward()

    record_property("fused_vs_dense_time", f"x{_seconds(dense_pass) / _seconds(fused_pass):.2f}")


def test_opsd_run_on_cuda_with_the_embedded_engine_on_the_gpu(tmp_path, record_property):
    """Two OPSD steps at TP 1: rollouts from the embedded engine on the trainer's GPU, the teacher
    pass, the fused loss, the optimizer, the in-process weight sync and its probe check."""
    hf = save_tiny_model("qwen3", tmp_path / "hf")
    config = write_config(tmp_path, hf, steps=2, checkpoint={"dir": str(tmp_path / "run" / "ckpt"), "interval": 2,
                                                             "keep_last": 1})
    seen = {}

    def build(cfg):
        components = build_components(cfg)
        seen["engine"] = str(components.engine.device)
        seen["trainer"] = str(next(components.chunks[0].parameters()).device)
        return components

    summary = train(load_train(config), build=build)
    assert seen["engine"].startswith("cuda") and seen["trainer"].startswith("cuda"), seen
    steps = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps) and summary["steps"] == 2
    assert all(s["probe/logprob_abs_diff_max"] < 1e-3 for s in steps), [s["probe/logprob_abs_diff_max"] for s in steps]
    last = steps[-1]
    for key in ("time/rollout", "time/teacher_pass", "time/student_pass", "time/optimizer", "time/weight_sync"):
        record_property(key.removeprefix("time/") + "_s", f"{last[key]:.3f}")
    record_property("peak_gib", f"{last['peak_memory_bytes'] / 2**30:.2f}")


def test_lora_on_cuda_matches_peft(groups, tmp_path, record_property):
    """Adapters on every projection against PEFT's on the same weights, logits and one adapter's
    gradient, with Megatron's local spec and with the norm inside q/k/v and gate/up (TE's spec)."""
    hf = save_tiny_model("qwen3_untied", tmp_path / "hf")
    cfg = LoraConfig(r=4, alpha=8.0)
    reference = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32),
                                    peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                    target_modules=[m.split(".")[-1] for m in HF_MODULES.values()]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in reference.modules():
            if hasattr(module, "lora_B"):
                module.lora_B["default"].weight.copy_(0.1 * torch.randn(module.lora_B["default"].weight.shape, generator=g))
    reference.save_pretrained(tmp_path / "adapters")
    reference = reference.cuda().eval()
    ids = torch.randint(0, 1000, (2, 24), generator=g).cuda()
    want = reference(ids).logits
    want.sum().backward()
    ref_grad = reference.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    arch = parse_hf_config(load_hf_config(hf), tp=1)
    for name, spec in (("local", None), ("fused_norm", fused_norm_spec(arch))):
        chunks = build_model(hf, spec=spec, groups=groups)
        load_hf_weights(chunks, hf)
        add_adapters(chunks, cfg, seed=1)
        load_peft_adapters(chunks, tmp_path / "adapters", cfg)
        model = chunks[0]
        logits = model(ids, torch.arange(24, device="cuda").expand(2, -1), attention_mask(torch.zeros_like(ids)),
                       gather_logits=True)[..., :1000]
        logits.sum().backward()
        diff = (logits - want).abs().max().item()
        adapters = model.decoder.layers[0].self_attention.lora_qkv
        grad = adapters.pair("q")[1].grad
        grad_err = ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
        record_property(f"{name}_logit_diff", f"{diff:.1e}")
        assert diff < 1e-4 and grad_err < 1e-4, (name, diff, grad_err)


def test_masked_grouped_query_attention_stays_in_a_fused_kernel(groups, record_property):
    """The local spec's attention on a packed row (bool mask, 2 query heads per key/value head, bf16)
    runs forward and backward with SDPA's math backend disallowed: it never forms [b, h, s, s]."""
    chunks = build_model(_one_layer(), torch.bfloat16, groups=groups)
    attention = chunks[0].decoder.layers[0].self_attention.core_attention
    s, heads, kv_heads, dim = 4096, 16, 8, 128
    q = torch.randn(s, 1, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(s, 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    masked = attention_mask(_segments(s, 4)[None])
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        attention(q, k, v, masked).float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    try:  # finding 12 of the GPU-readiness note: grouped heads and a mask without repeating them
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            F.scaled_dot_product_attention(*(t.detach().permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=~masked,
                                           enable_gqa=True)
        grouped = "runs"
    except RuntimeError:
        grouped = "refused"
    record_property("efficient_kernel_with_gqa_and_mask", grouped)


def test_packed_attention_memory_at_16k_tokens(groups, record_property):
    """One Qwen3-0.6B-wide layer, forward and backward over a packed row of 4k and of 16k tokens
    (8 segments, bf16): the peak stays far below the math backend's fp32 [b, h, s, s] scores."""
    chunks = build_model(_one_layer(), torch.bfloat16, groups=groups)
    model = chunks[0]
    peaks = {}
    for s in (4096, 16384):
        ids = torch.randint(0, 1000, (1, s), device="cuda")
        segments = _segments(s, 8)
        positions = (torch.arange(s, device="cuda") - torch.searchsorted(segments, segments, right=False))[None]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(ids, positions, attention_mask(segments[None]), output="hidden").float().sum().backward()
        torch.cuda.synchronize()
        peaks[s] = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
    scores = 16 * 16384 ** 2 * 4  # what the math backend would hold for one layer at 16k
    record_property("peak_4k_gib", f"{peaks[4096] / 2**30:.2f}")
    record_property("peak_16k_gib", f"{peaks[16384] / 2**30:.2f}")
    record_property("ratio_16k_4k", f"{peaks[16384] / peaks[4096]:.1f}")
    assert peaks[16384] < scores / 4, peaks


def test_student_step_model_flops_against_the_measured_matmul_peak(groups, record_property):
    """Qwen3-0.6B (random weights, bf16, TP 1): forward and backward of one 8,192-token packed
    micro-batch (4 sequences) with the fused OPSD loss, its model FLOP/s over a bf16 matmul's."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    peak = 2 * 8192 ** 3 / _seconds(lambda: a @ a, repeats=10)
    config = load_hf_config(QWEN3_0P6B)
    model = build_model(config, torch.bfloat16, groups=groups)[0]
    tokens, segments = 8192, 4
    ids = torch.randint(0, config.vocab_size, (1, tokens), device="cuda")
    seg = _segments(tokens, segments)
    positions = (torch.arange(tokens, device="cuda") - torch.searchsorted(seg, seg, right=False))[None]
    mask = attention_mask(seg[None])
    teacher = torch.randn(tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    loss_cfg = LossConfig(vocab_size=config.vocab_size)

    def step() -> None:
        hidden = model(ids, positions, mask, output="hidden")[0]
        weight = model.output_weight()
        fused_token_divergence(hidden, teacher, weight, weight.detach(), loss_cfg).mean().backward()

    seconds = _seconds(step)
    h, layers, heads, kv, dim, ffn = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                                      config.num_key_value_heads, config.head_dim, config.intermediate_size)
    per_layer = h * (heads + 2 * kv) * dim + heads * dim * h + 3 * h * ffn
    attention = 2 * 2 * heads * dim * (tokens / segments) / 2  # q k^T and p v over half a segment, per token
    flops = 3 * tokens * (2 * layers * per_layer + layers * attention + 2 * config.vocab_size * h)
    mfu = flops / seconds / peak
    record_property("matmul_peak_tflops", f"{peak / 1e12:.0f}")
    record_property("step_tflops", f"{flops / seconds / 1e12:.0f}")
    record_property("mfu", f"{mfu:.1%}")
    assert mfu > 0.05, mfu


def test_an_offloaded_teacher_on_cuda_computes_the_resident_ones_numbers():
    """EMA teacher of bf16 parameters, resident and offloaded to pinned host memory (asynchronous
    copies, the update on the device): the same weights in the model and the same fp32 accumulator."""
    shapes = [(SWAP_BLOCK + 17,), (3, 1000), (2 * SWAP_BLOCK,)]
    g = torch.Generator(device="cuda").manual_seed(0)
    student = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).bfloat16()) for s in shapes]
    teachers = {offload: Teacher(TeacherConfig(mode="ema", ema_decay=0.9, offload=offload), student)
                for offload in (False, True)}
    assert teachers[True].weights[0].is_pinned() and teachers[True].master[0].is_pinned()
    for _ in range(3):
        with torch.no_grad():
            for p in student:
                p.add_(torch.randn(p.shape, device="cuda", generator=g).bfloat16())
        seen = {}
        for offload, teacher in teachers.items():
            before = [p.detach().clone() for p in student]
            with teacher.weights_in_model():
                seen[offload] = [p.detach().clone() for p in student]
            assert all(torch.equal(a, b) for a, b in zip(before, student)), "the student's weights came back changed"
            teacher.update()
        assert all(torch.equal(a, b) for a, b in zip(seen[False], seen[True]))
    resident, offloaded = (teachers[k].state_tensors() for k in (False, True))
    assert all(torch.equal(a, b.cuda()) for a, b in zip(resident, offloaded))


def test_a_weight_broadcast_from_cuda_tensors_over_gloo_reaches_a_stand_in(groups, tmp_path, record_property):
    """The distributed sync with one GPU: a gloo weight group (NCCL needs a GPU per rank), the
    trainer's CUDA tensors in buckets, into a CPU stand-in server; the probe check passes."""
    from megatron_opsd.rollout.sglang.config import SGLangEngineConfig
    from megatron_opsd.rollout.sglang.engine import SGLangEngine
    from megatron_opsd.rollout.sglang.fleet import Fleet
    from megatron_opsd.rollout.sync.base import ProbeCheck, SyncConfig
    from megatron_opsd.rollout.sync.distributed import DistributedSync

    hf = save_tiny_model("qwen3", tmp_path / "hf")
    cfg = SGLangEngineConfig.model_validate({
        "kind": "sglang", "servers": {"count": 1, "command": ["python", "-m", "megatron_opsd.cli", "serve"]},
        "router": {"enabled": False}, "timeouts": {"startup_s": 300, "control_s": 120}})
    fleet = Fleet(cfg, tmp_path / "logs", api_key="gpu-check")
    fleet.start(str(hf), version=0)
    engine = SGLangEngine(fleet, cfg, vocab_size=1000, run_id="gpu")
    try:
        chunks = build_model(hf, groups=groups)
        load_hf_weights(chunks, hf)
        with torch.no_grad():
            for p in chunks[0].parameters():
                p.add_(0.01)
        probe = ProbeCheck(chunks, list(range(1, 33)), 1.0, 1e-3, 1000)
        sync = DistributedSync(engine, chunks, probe, SyncConfig(kind="distributed", backend="gloo", bucket_mb=0.1),
                               tmp_path / "weights", AutoConfig.from_pretrained(hf).save_pretrained, "127.0.0.1", 120)
        metrics = sync.push(version=6)
        assert metrics["weight_sync/servers_restarted"] == 0 and engine.weight_version == 6, metrics
        record_property("probe_diff", f"{metrics['probe/logprob_abs_diff_max']:.1e}")
        record_property("sync_s", f"{metrics['time/weight_sync']:.2f}")
        sync.close()
    finally:
        engine.close()


def _one_layer() -> AutoConfig:
    """Qwen3-0.6B's widths in one layer and a small vocabulary (a layer-level measurement)."""
    config = load_hf_config(QWEN3_0P6B).to_dict()
    config.pop("model_type", None)
    return AutoConfig.for_model("qwen3", **{**config, "num_hidden_layers": 1, "vocab_size": 1000})


def _segments(length: int, count: int) -> torch.Tensor:
    """Segment ids of ``count`` equal sequences packed into one row of ``length`` tokens, on the GPU."""
    return torch.arange(length, device="cuda") // math.ceil(length / count)
