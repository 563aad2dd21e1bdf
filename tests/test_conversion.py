"""Bad checkpoints and configs give clear errors; outputs appear atomically (single process)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from megatron_opsd.fileio import CheckpointError, atomic_output_dir
from megatron_opsd.models.architectures import UnsupportedConfigError, parse_hf_config
from megatron_opsd.models.bridge import hf_shapes
from megatron_opsd.models.hf_io import INDEX, HFReader
from tests.support.tiny_models import CONFIGS, save_tiny_model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture
def ckpt(source, tmp_path):
    return shutil.copytree(source, tmp_path / "ckpt")


def read(path):
    return HFReader(path, hf_shapes(parse_hf_config(CONFIGS["qwen2"])))


def index(path):
    return json.loads((path / INDEX).read_text())["weight_map"]


def test_valid_checkpoint_reads(ckpt):
    reader = read(ckpt)
    name = "model.layers.1.self_attn.k_proj.bias"
    assert reader.path(name) == ckpt / index(ckpt)[name]
    assert reader.slice(name)[:].shape == (32,)


def test_missing_shard_file(ckpt):
    shard = index(ckpt)["model.layers.1.mlp.down_proj.weight"]
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard file .*{shard}"):
        read(ckpt)


def rewrite(ckpt, name, change):
    """Apply ``change`` to the tensors of the shard holding ``name`` and keep the index in sync."""
    shard = index(ckpt)[name]
    tensors = load_file(ckpt / shard)
    change(tensors)
    save_file(tensors, ckpt / shard)
    data = json.loads((ckpt / INDEX).read_text())
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if v != shard} | dict.fromkeys(tensors, shard)
    (ckpt / INDEX).write_text(json.dumps(data))
    return shard


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = rewrite(ckpt, name, lambda t: t.update({name: torch.zeros(64, 32)}))
    with pytest.raises(
        CheckpointError, match=rf"tensor {name} in .*{shard} has shape \[64, 32\], config expects \[64, 64\]"
    ):
        read(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.o_proj.bias"
    shard = rewrite(ckpt, "model.layers.0.self_attn.o_proj.weight", lambda t: t.update({name: torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {name} in .*{shard}"):
        read(ckpt)


def test_missing_tensor(ckpt):
    name = "model.layers.1.mlp.gate_proj.weight"
    rewrite(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        read(ckpt)


def test_index_points_to_wrong_file(ckpt):
    data = json.loads((ckpt / INDEX).read_text())
    name = "model.norm.weight"
    other = next(f for f in data["weight_map"].values() if f != data["weight_map"][name])
    data["weight_map"][name] = other
    (ckpt / INDEX).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"tensor {name} is in .* but the index says {other}"):
        read(ckpt)


BAD_CONFIGS = {
    "architectures": LlamaConfig(architectures=["GPT2LMHeadModel"]),
    "use_sliding_window": Qwen2Config(use_sliding_window=True, sliding_window=128, architectures=["Qwen2ForCausalLM"]),
    "sliding_window": MistralConfig(sliding_window=4096, architectures=["MistralForCausalLM"]),
    "rope_type": LlamaConfig(
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, architectures=["LlamaForCausalLM"]
    ),
    "attention_bias": LlamaConfig(attention_bias=True, architectures=["LlamaForCausalLM"]),
    "hidden_act": LlamaConfig(hidden_act="gelu", architectures=["LlamaForCausalLM"]),
    "mlp_bias": LlamaConfig(mlp_bias=True, architectures=["LlamaForCausalLM"]),
}


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_unsupported_config_field_is_named(field):
    with pytest.raises(UnsupportedConfigError, match=f"unsupported config field .*{field}"):
        parse_hf_config(BAD_CONFIGS[field])


def test_vocab_padding_and_mistral_without_window():
    arch = parse_hf_config(
        MistralConfig(vocab_size=1000, sliding_window=None, architectures=["MistralForCausalLM"]), tp=4
    )
    assert (arch.vocab_size, arch.padded_vocab_size) == (1000, 1024)
    assert parse_hf_config(CONFIGS["qwen2"], tp=2, vocab_divisor=100).padded_vocab_size == 1000


def test_interrupted_output_never_looks_finished(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_output_dir(out) as tmp:
        (tmp / "model.safetensors.index.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not out.exists()
    with atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="already exists"), atomic_output_dir(out):
        pass


def test_corrupt_shard_file_is_named(ckpt):
    shard = index(ckpt)["model.norm.weight"]
    (ckpt / shard).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"cannot read shard file .*{shard}"):
        read(ckpt)
