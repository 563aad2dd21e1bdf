"""Two-rank checks of LoRA on Megatron against HF PEFT at TP=1, TP=2 and PP=2 (and under Transformer
Engine's fused norm-linear contract, tests/support/te_contract.py): forward and
gradients with the same adapter weights, the merged export against ``merge_and_unload``, the
adapters-off model against the base, and the adapters' checkpoint resharded across layouts.
Run by tests/test_lora.py."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers import AutoModelForCausalLM

from megatron_opsd.models import build_model, checkpoint, load_hf_config, parse_hf_config
from megatron_opsd.models.bridge import load_hf_weights, model_hf_tensors
from megatron_opsd.models.forward import forward_only
from megatron_opsd.models.lora import HF_MODULES, LoraConfig, adapters_disabled, adapters_of, add_adapters
from megatron_opsd.models.peft_format import load_peft_adapters, write_peft_adapters
from megatron_opsd.parallel import Layout, initialize
from tests.support.distributed import run_checks, workdir_arg
from tests.support.te_contract import fused_norm_spec
from tests.support.tiny_models import save_tiny_model
from tests.workers.models_conversion import batch

TOL = 1e-4
CFG = LoraConfig(r=4, alpha=8.0)
WORK = Path()


def setup() -> None:
    global WORK
    WORK = workdir_arg()
    if dist.get_rank() == 0:
        save_tiny_model("qwen3_untied", WORK / "hf")
    dist.barrier()


def full_adapters(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (A, B) per HF module name, of the full shapes (B non-zero, so the adapters matter)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(m) for m in HF_MODULES.values()):
            out[name] = (0.1 * torch.randn(CFG.r, module.in_features, generator=g),
                         0.1 * torch.randn(module.out_features, CFG.r, generator=g))
    return out


def peft_model(weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> peft.PeftModel:
    base = AutoModelForCausalLM.from_pretrained(WORK / "hf", dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=CFG.r, lora_alpha=CFG.alpha, lora_dropout=0.0,
                                                      target_modules=[m.split(".")[-1] for m in HF_MODULES.values()]))
    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if key in weights and hasattr(module, "lora_A"):
                module.lora_A["default"].weight.copy_(weights[key][0])
                module.lora_B["default"].weight.copy_(weights[key][1])
    return model


def megatron_model(layout: Layout, weights: dict | None, fused_norm: bool = False) -> list[torch.nn.Module]:
    """The tiny model with adapters at ``layout``, loaded from ``weights`` saved by PEFT itself;
    ``fused_norm``: q/k/v and gate/up normalise their input inside, as under Transformer Engine."""
    groups = initialize(layout)
    arch = parse_hf_config(load_hf_config(WORK / "hf"), tp=layout.tp)
    chunks = build_model(WORK / "hf", spec=fused_norm_spec(arch) if fused_norm else None, groups=groups)
    load_hf_weights(chunks, WORK / "hf")
    add_adapters(chunks, CFG, seed=1)
    if weights is not None:
        saved = WORK / "peft_reference"
        if dist.get_rank() == 0:
            peft_model(weights).save_pretrained(saved)
        dist.barrier()
        load_peft_adapters(chunks, saved, CFG)
    return chunks


def local_of(full: torch.Tensor, kind: str, which: str) -> torch.Tensor:
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    sharded = (kind, which) in (("column", "B"), ("row", "A"))
    return full.chunk(size, dim=0 if kind == "column" else 1)[rank] if sharded else full


def check_forward_and_gradients(layout: Layout, fused_norm: bool = False) -> None:
    ids = batch()
    reference = peft_model(weights := full_adapters(AutoModelForCausalLM.from_pretrained(WORK / "hf")))
    probe = torch.randn(*ids["input_ids"].shape, 1000, generator=torch.Generator().manual_seed(9))
    ref_logits = reference(ids["input_ids"]).logits
    (ref_logits * probe).sum().backward()
    chunks = megatron_model(layout, weights, fused_norm)
    if fused_norm:  # the norms live in the linears, as in Transformer Engine's spec
        assert hasattr(chunks[0].decoder.layers[0].self_attention.linear_qkv, "layer_norm_weight")
    logits = forward_only(chunks, [ids], gather_logits=True)
    if ps.is_pipeline_last_stage():
        diff = (logits[0][..., :1000] - ref_logits.detach()).abs().max().item()
        assert diff < TOL, f"{layout}: logits differ from PEFT's by {diff:.2e}"
    (model,) = chunks
    backward_through_stages(model, ids, probe)
    ref_grads = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    for layer in model.decoder.layers:
        prefix = f"model.layers.{layer.layer_number - 1}."
        for adapters in adapters_of([layer]):
            for proj in adapters.targets:
                ref = ref_grads[prefix + HF_MODULES[proj]]
                for which, param, ref_param in zip("AB", adapters.pair(proj),
                                                   (ref.lora_A["default"].weight, ref.lora_B["default"].weight)):
                    ref_grad = local_of(ref_param.grad, adapters.kind, which)
                    diff = ((param.grad - ref_grad).abs().max() / ref_grad.abs().max()).item()
                    assert diff < TOL, f"{layout}: grad of {prefix}{proj}_{which} differs from PEFT's by {diff:.2e} " \
                        f"of its largest entry {ref_grad.abs().max().item():.3g}"
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert not frozen, f"base parameters train: {frozen[:3]}"


def backward_through_stages(model: torch.nn.Module, ids: dict, probe: torch.Tensor) -> None:
    """Backward of sum(logits * probe) through this rank's stage; with PP=2 the activations go from
    stage 0 to stage 1 and their gradient back, point to point."""
    args = (ids["input_ids"], ids["position_ids"], ids["attention_mask"])
    if ps.get_pipeline_model_parallel_world_size() == 1:
        (model(*args, gather_logits=True)[..., :1000] * probe).sum().backward()
        return
    if ps.is_pipeline_first_stage():
        activations = model(*args)
        dist.send(activations.detach(), dst=1)
        grad = torch.empty_like(activations)
        dist.recv(grad, src=1)
        activations.backward(grad)
    else:
        received = torch.empty(args[0].shape[1], args[0].shape[0], model.config.hidden_size)
        dist.recv(received, src=0)
        received.requires_grad_()
        model.set_input_tensor(received)
        (model(*args, gather_logits=True)[..., :1000] * probe).sum().backward()
        dist.send(received.grad, dst=0)


def check_merged_export_and_base(layout: Layout, fused_norm: bool = False) -> None:
    """The merged export is PEFT's merge_and_unload, and serves the model that was trained: the
    exported weights, run by transformers, give the adapted model's logits."""
    ids = batch()
    weights = full_adapters(AutoModelForCausalLM.from_pretrained(WORK / "hf"))
    merged = peft_model(weights).merge_and_unload().state_dict()
    chunks = megatron_model(layout, weights, fused_norm)
    adapted = forward_only(chunks, [ids], gather_logits=True)
    if ps.is_pipeline_last_stage():
        served = AutoModelForCausalLM.from_pretrained(WORK / "hf", dtype=torch.float32).eval()
        served.load_state_dict(merged)
        with torch.no_grad():
            diff = (adapted[0][..., :1000] - served(ids["input_ids"]).logits).abs().max().item()
        assert diff < TOL, f"{layout}: the merged export serves logits {diff:.2e} away from the adapted model's"
    for name, tensor in model_hf_tensors(chunks):
        diff = (tensor - merged[name]).abs().max().item()
        assert diff < 1e-6, f"{layout}: merged {name} differs from PEFT's merge_and_unload by {diff:.2e}"
    with adapters_disabled(chunks):
        off = forward_only(chunks, [ids], gather_logits=True)
    groups = initialize(layout)
    base = build_model(WORK / "hf", groups=groups, spec=fused_norm_spec(parse_hf_config(load_hf_config(WORK / "hf"),
                                                                                         tp=layout.tp))
                       if fused_norm else None)
    load_hf_weights(base, WORK / "hf")
    plain = forward_only(base, [ids], gather_logits=True)
    if ps.is_pipeline_last_stage():
        assert torch.equal(off[0], plain[0]), f"{layout}: adapters off is not the base model"


def check_adapters_reshard() -> None:
    """Adapters saved at TP=2 load at PP=2 to the same logits."""
    ids = batch()
    weights = full_adapters(AutoModelForCausalLM.from_pretrained(WORK / "hf"))
    expected = forward_only(megatron_model(Layout(2, 1), weights), [ids], gather_logits=True)
    out = WORK / "adapters_tp2"
    checkpoint.save(megatron_model(Layout(2, 1), weights), out, hf_files_from=WORK / "hf", overwrite=True)
    chunks = megatron_model(Layout(1, 2), None)
    checkpoint.load(chunks, out)
    got = forward_only(chunks, [ids], gather_logits=True)
    if ps.is_pipeline_last_stage():
        diff = (got[0] - expected[0]).abs().max().item()
        assert diff < TOL, f"adapters resharded TP2 -> PP2 change the logits by {diff:.2e}"


def check_peft_export_reloads_in_peft(layout: Layout) -> None:
    """The adapters written in PEFT's format load in ``peft`` on the HF model to the same logits."""
    ids = batch()
    chunks = megatron_model(layout, full_adapters(AutoModelForCausalLM.from_pretrained(WORK / "hf")))
    ours = forward_only(chunks, [ids], gather_logits=True)
    out = write_peft_adapters(chunks, WORK / f"exported_{layout.tp}_{layout.pp}", CFG, base_model=str(WORK / "hf"))
    if dist.get_rank() == 0:
        base = AutoModelForCausalLM.from_pretrained(WORK / "hf", dtype=torch.float32)
        reloaded = peft.PeftModel.from_pretrained(base, out).eval()
        with torch.no_grad():
            theirs = reloaded(ids["input_ids"]).logits
    dist.barrier()
    if ps.is_pipeline_last_stage() and dist.get_rank() == 0:
        diff = (ours[0][..., :1000] - theirs).abs().max().item()
        assert diff < TOL, f"{layout}: PEFT's reload of the exported adapters differs by {diff:.2e}"


def check_dropout_tp2() -> None:
    """With dropout, training-mode outputs differ from eval mode and backward runs at TP=2; eval
    mode is the no-dropout model."""
    ids = batch()
    groups = initialize(Layout(2, 1))
    chunks = build_model(WORK / "hf", groups=groups)
    load_hf_weights(chunks, WORK / "hf")
    add_adapters(chunks, CFG.model_copy(update={"dropout": 0.5}), seed=1)
    (model,) = chunks
    with torch.no_grad():
        for adapters in adapters_of(chunks):
            for proj in adapters.targets:
                adapters.pair(proj)[1].fill_(0.05)
    args = (ids["input_ids"], ids["position_ids"], ids["attention_mask"])
    model.eval()
    with torch.no_grad():
        plain = model(*args, gather_logits=True)
    model.train()
    noisy = model(*args, gather_logits=True)
    noisy.sum().backward()
    assert not torch.allclose(noisy, plain), "dropout changed nothing in training mode"
    assert all(p.grad is not None for a in adapters_of(chunks) for p in a.parameters())


CHECKS = {
    "forward_and_gradients_tp1": lambda: check_forward_and_gradients(Layout(1, 1)),
    "forward_and_gradients_tp2": lambda: check_forward_and_gradients(Layout(2, 1)),
    "forward_and_gradients_pp2": lambda: check_forward_and_gradients(Layout(1, 2)),
    "merged_export_and_base_tp1": lambda: check_merged_export_and_base(Layout(1, 1)),
    "merged_export_and_base_tp2": lambda: check_merged_export_and_base(Layout(2, 1)),
    "merged_export_and_base_pp2": lambda: check_merged_export_and_base(Layout(1, 2)),
    "forward_and_gradients_fused_norm_tp1": lambda: check_forward_and_gradients(Layout(1, 1), fused_norm=True),
    "forward_and_gradients_fused_norm_tp2": lambda: check_forward_and_gradients(Layout(2, 1), fused_norm=True),
    "merged_export_and_base_fused_norm_tp2": lambda: check_merged_export_and_base(Layout(2, 1), fused_norm=True),
    "adapters_reshard": check_adapters_reshard,
    "dropout_tp2": check_dropout_tp2,
    "peft_export_tp2": lambda: check_peft_export_reloads_in_peft(Layout(2, 1)),
    "peft_export_tp1": lambda: check_peft_export_reloads_in_peft(Layout(1, 1)),
}

if __name__ == "__main__":
    run_checks(CHECKS, setup)
