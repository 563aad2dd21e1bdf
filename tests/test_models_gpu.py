"""CUDA checks (skipped without CUDA; run them all with tools/gpu_check.sh): NCCL at world size 1,
bf16 parity with transformers, and the Transformer Engine layer spec when TE is installed."""

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from megatron_opsd.models import attention_mask, build_model
from megatron_opsd.models.bridge import load_hf_weights
from megatron_opsd.parallel import Layout, initialize
from tests.support.tiny_models import save_tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def groups():
    return initialize(Layout())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model("qwen3", tmp_path_factory.mktemp("gpu") / "qwen3")


def log_probs(model_dir, dtype, use_te=None, hf=False, groups=None):
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        if hf:
            logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).cuda().eval()(ids).logits
        else:
            chunks = build_model(model_dir, dtype, use_te=use_te, groups=groups)
            load_hf_weights(chunks, model_dir)
            pos = torch.arange(64, device="cuda").expand(2, -1)
            logits = chunks[0].eval()(ids, pos, attention_mask(torch.zeros_like(ids)), gather_logits=True)[..., :1000]
    return logits.float().log_softmax(-1)


def test_nccl_world_size_1(groups):
    assert groups.platform.backend == "nccl" and dist.get_backend() == "nccl" and dist.get_world_size() == 1
    x = torch.full((4,), 2.0, device="cuda")
    dist.all_reduce(x)
    assert x.tolist() == [2.0] * 4


def check_bf16(source, use_te, record_property, groups):
    """Megatron's bf16 error (vs transformers fp32) is at most twice transformers' own bf16 error."""
    reference = log_probs(source, torch.float32, hf=True)
    hf_err = (log_probs(source, torch.bfloat16, hf=True) - reference).abs().max().item()
    ours_err = (log_probs(source, torch.bfloat16, use_te=use_te, groups=groups) - reference).abs().max().item()
    record_property("hf_bf16_err", f"{hf_err:.3e}")
    record_property("megatron_bf16_err", f"{ours_err:.3e}")
    assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)


def test_bf16_parity_local_spec(groups, source, record_property):
    check_bf16(source, False, record_property, groups)


def test_fp32_parity_local_spec_on_cuda(groups, source, record_property):
    ours = log_probs(source, torch.float32, use_te=False, groups=groups)
    err = (ours - log_probs(source, torch.float32, hf=True)).abs().max().item()
    record_property("max_logprob_diff", f"{err:.3e}")
    assert err <= 1e-4


def test_bf16_parity_te_spec(groups, source, record_property):
    pytest.importorskip("transformer_engine")
    check_bf16(source, True, record_property, groups)
