"""Two-rank checks of the models package: parity with transformers at TP=1, TP=2, PP=2, the
streaming export, packed sequences, and dist-checkpoint resharding. Run by tests/test_models.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_opsd.models import attention_mask, build_model, checkpoint
from megatron_opsd.models.bridge import load_hf_weights, model_hf_tensors, stage_hf_tensors, write_hf_model
from megatron_opsd.models.forward import forward_only
from megatron_opsd.models.hf_io import copy_non_weight_files
from megatron_opsd.parallel import Layout, initialize
from tests.support.distributed import run_checks, workdir_arg
from tests.support.tiny_models import CONFIGS, save_tiny_model

TOL = 1e-4
BATCH, SEQ = 2, 24
WORK = Path()  # set by setup() from --workdir


def hf_dir(name: str) -> Path:
    return WORK / "hf" / name


def setup() -> None:
    global WORK
    WORK = workdir_arg()
    if dist.get_rank() == 0:
        for name in CONFIGS:
            save_tiny_model(name, hf_dir(name))
    dist.barrier()


def batch(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=g)
    return {
        "input_ids": ids,
        "position_ids": torch.arange(SEQ).expand(BATCH, -1),
        "attention_mask": attention_mask(torch.zeros_like(ids)),
    }


def hf_reference(name: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """transformers' logits, final hidden states and state dict for ``name``."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir(name), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(batch()["input_ids"], output_hidden_states=True)
    return out.logits, out.hidden_states[-1], model.state_dict()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{what}: max |diff| {diff:.3e} > {TOL}"


def check_parity(layout: Layout) -> None:
    """Logits (gathered and vocab-parallel), hidden states, output weight and export vs transformers."""
    groups = initialize(layout)
    for name in CONFIGS:
        ref_logits, ref_hidden, ref_state = hf_reference(name)
        chunks = build_model(hf_dir(name), groups=groups)
        load_hf_weights(chunks, hf_dir(name))
        (model,) = chunks
        assert (model.true_vocab_size, model.padded_vocab_size) == (
            1000,
            128 * layout.tp * -(-1000 // (128 * layout.tp)),
        )
        logits = forward_only(chunks, [batch()], gather_logits=True)
        hidden = forward_only(chunks, [batch()], output="hidden")
        local = forward_only(chunks, [batch()])
        if ps.is_pipeline_last_stage():
            assert_close(logits[0][..., :1000], ref_logits, f"{name} {layout} logits")
            assert logits[0][..., 1000:].abs().max() == 0, "padded vocab columns must be 0 logits"
            assert_close(hidden[0], ref_hidden, f"{name} {layout} hidden")
            rows = model.padded_vocab_size // layout.tp
            lo = ps.get_tensor_model_parallel_rank() * rows
            assert_close(local[0], logits[0][..., lo : lo + rows], f"{name} {layout} vocab-parallel logits")
            weight = model.output_weight()
            full = ref_state["lm_head.weight"]
            assert weight.shape == (rows, 64)
            assert torch.equal(weight[: max(0, min(rows, 1000 - lo))], full[lo : lo + rows])
        expected = {k for k in ref_state if not (k == "lm_head.weight" and CONFIGS[name].tie_word_embeddings)}
        seen = set()
        for hf_name, tensor in model_hf_tensors(chunks):
            assert hf_name not in seen, f"{hf_name} exported twice"
            seen.add(hf_name)
            assert torch.equal(tensor, ref_state[hf_name]), f"{name} {layout}: exported {hf_name} differs"
        if dist.get_rank() == 0:  # the whole model arrives on rank 0, nothing elsewhere
            assert seen == expected, f"{name} {layout}: missing {expected - seen}, extra {seen - expected}"
        else:
            assert not seen, f"{name} {layout}: rank {dist.get_rank()} received {sorted(seen)[:3]}"
        # Each stage's sender (its first TP rank) yields exactly its own layers; together, the model.
        own = {}
        for hf_name, tensor in stage_hf_tensors(chunks):
            assert torch.equal(tensor, ref_state[hf_name]), f"{name} {layout}: stage tensor {hf_name} differs"
            own[hf_name] = tensor
        if ps.get_tensor_model_parallel_rank() != 0:
            assert not own, f"{name} {layout}: a non-sender TP rank yielded {sorted(own)[:3]}"
        stages = [None] * dist.get_world_size()
        dist.all_gather_object(stages, sorted(own))
        names = [n for s in stages for n in s]
        assert len(names) == len(set(names)) and set(names) == expected, f"{name} {layout}: stage exports overlap or miss"
        layers = {int(n.split(".")[2]) for n in own if n.startswith("model.layers.")}
        if own and layout.pp > 1:
            first = ps.get_pipeline_model_parallel_rank() * (2 // layout.pp)
            assert layers == set(range(first, first + 2 // layout.pp)), f"stage holds layers {layers}"


def check_parity_tp1() -> None:
    check_parity(Layout(1, 1))


def check_parity_tp2() -> None:
    check_parity(Layout(2, 1))


def check_parity_pp2() -> None:
    check_parity(Layout(1, 2))


def check_packed_equals_separate() -> None:
    """Two sequences packed in one row (block-diagonal mask, positions restart) give the same
    logits as each sequence alone, at TP=2."""
    groups = initialize(Layout(2, 1))
    chunks = build_model(hf_dir("qwen2"), groups=groups)
    load_hf_weights(chunks, hf_dir("qwen2"))
    (model,) = chunks
    ids = batch()["input_ids"][:1]
    a, b = ids[:, :10], ids[:, 10:]
    packed_pos = torch.cat([torch.arange(10), torch.arange(SEQ - 10)])[None]
    segments = torch.cat([torch.zeros(10), torch.ones(SEQ - 10)])[None]
    with torch.no_grad():
        packed = model(ids, packed_pos, attention_mask(segments), gather_logits=True)
        alone = [
            model(x, torch.arange(x.shape[1])[None], attention_mask(torch.zeros_like(x)), gather_logits=True)
            for x in (a, b)
        ]
    assert_close(packed, torch.cat(alone, dim=1), "packed vs separate")


def check_position_ids_drive_rope() -> None:
    """Gapped position ids (RoPE is shift-invariant, gaps are not) match transformers at TP=2."""
    groups = initialize(Layout(2, 1))
    chunks = build_model(hf_dir("llama"), groups=groups)
    load_hf_weights(chunks, hf_dir("llama"))
    b = batch()
    gaps = torch.randint(1, 4, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    positions = gaps.cumsum(-1) - gaps[:, :1]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(b["input_ids"], position_ids=positions).logits
        ours = chunks[0](b["input_ids"], positions, b["attention_mask"], gather_logits=True)[..., :1000]
        default = chunks[0](b["input_ids"], b["position_ids"], b["attention_mask"], gather_logits=True)[..., :1000]
    assert_close(ours, ref, "gapped position ids")
    effect = (default - ref).abs().max().item()
    assert effect > 10 * TOL, f"position ids changed logits by only {effect:.2e}"


def check_cpu_platform_and_seeds() -> None:
    """CUDA device requests land on the CPU; the TP RNG stream differs per TP rank, the default
    stream is shared (Megatron's seeding semantics, here on the CPU generator)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    platform = initialize(Layout(2, 1), seed=7).platform
    assert (platform.backend, platform.device.type) == ("gloo", "cpu")
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    with get_cuda_rng_tracker().fork():
        tp_draw = torch.rand(4)
    shared_draw = torch.rand(4)
    draws = [None, None]
    dist.all_gather_object(draws, (tp_draw, shared_draw))
    assert not torch.equal(draws[0][0], draws[1][0]), "TP ranks must draw different dropout masks"
    assert torch.equal(draws[0][1], draws[1][1]), "default RNG must agree across TP ranks"


def check_checkpoint_reshard() -> None:
    """Saved at TP=2, loaded at TP=1 and PP=2: same logits as transformers."""
    ref_logits, _, _ = hf_reference("llama")
    groups = initialize(Layout(2, 1))
    chunks = build_model(hf_dir("llama"), groups=groups)
    load_hf_weights(chunks, hf_dir("llama"))
    ckpt = WORK / "ckpt_llama_tp2"
    checkpoint.save(chunks, ckpt, hf_files_from=hf_dir("llama"))
    assert json.loads((ckpt / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    for layout in (Layout(1, 1), Layout(1, 2)):
        groups = initialize(layout)
        chunks = build_model(checkpoint.hf_config_dir(ckpt), groups=groups)
        checkpoint.load(chunks, ckpt)
        logits = forward_only(chunks, [batch()], gather_logits=True)
        if ps.is_pipeline_last_stage():
            assert_close(logits[0][..., :1000], ref_logits, f"TP2 checkpoint loaded at {layout}")


def check_roundtrip_bitwise() -> None:
    """HF -> Megatron (TP=2) -> dist checkpoint -> Megatron (PP=2) -> HF: identical tensors, equal config."""
    for name in CONFIGS:
        src = hf_dir(name)
        groups = initialize(Layout(2, 1))
        chunks = build_model(src, groups=groups)
        load_hf_weights(chunks, src)
        ckpt = WORK / f"rt_{name}_ckpt"
        checkpoint.save(chunks, ckpt, hf_files_from=src)
        groups = initialize(Layout(1, 2))
        chunks = build_model(checkpoint.hf_config_dir(ckpt), groups=groups)
        checkpoint.load(chunks, ckpt)
        out = WORK / f"rt_{name}_hf"
        write_hf_model(chunks, out, lambda tmp, ckpt=ckpt: copy_non_weight_files(checkpoint.hf_config_dir(ckpt), tmp),
                       max_shard_bytes=100_000)
        original, converted = {}, {}
        for f in src.glob("*.safetensors"):
            original.update(load_file(f))
        for f in out.glob("*.safetensors"):
            converted.update(load_file(f))
        assert len(list(out.glob("*.safetensors"))) > 1, "expected several shards"
        assert original.keys() == converted.keys()
        for key, tensor in original.items():
            assert tensor.dtype == converted[key].dtype and torch.equal(tensor, converted[key]), key
        assert (src / "config.json").read_text() == (out / "config.json").read_text()
        configs = [AutoConfig.from_pretrained(d).to_dict() for d in (src, out)]
        for c in configs:
            c.pop("_name_or_path")
        assert configs[0] == configs[1]


CHECKS = {
    "cpu_platform_and_seeds": check_cpu_platform_and_seeds,
    "parity_tp1": check_parity_tp1,
    "parity_tp2": check_parity_tp2,
    "parity_pp2": check_parity_pp2,
    "packed_equals_separate": check_packed_equals_separate,
    "position_ids_drive_rope": check_position_ids_drive_rope,
    "checkpoint_reshard": check_checkpoint_reshard,
    "roundtrip_bitwise": check_roundtrip_bitwise,
}

if __name__ == "__main__":
    run_checks(CHECKS, setup=setup)
