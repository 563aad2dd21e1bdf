"""Stand-ins for Transformer Engine modules, with the contract of the real ones, for CPU tests of
what the product does differently under the TE layer spec (TE itself needs CUDA).

``NormedColumnParallelLinear`` is ``TELayerNormColumnParallelLinear``'s contract: the input norm
inside the linear (``layer_norm_weight``, ``normalization``, ``eps``, ``zero_centered_gamma``,
``return_layernorm_output=False`` as Megatron builds it), the layer's own norms identities, the same
parameter names (so the weight bridge maps it) and the same ``(output, bias)`` return. The norm is
``torch.nn.functional.rms_norm``, not the product's code.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor, nn

from megatron_opsd.models.architectures import Architecture, layer_spec


class NormedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        if config.normalization != "RMSNorm":
            raise ValueError("the stand-in implements TE's RMSNorm only")
        self.normalization, self.eps = config.normalization, config.layernorm_epsilon
        self.zero_centered_gamma, self.return_layernorm_output = config.layernorm_zero_centered_gamma, False
        self.layer_norm_weight = nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        gamma = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        return super().forward(F.rms_norm(x.float(), (x.shape[-1],), gamma.float(), self.eps).to(x.dtype))


def fused_norm_spec(arch: Architecture) -> ModuleSpec:
    """The local layer spec with q/k/v and gate/up as fused norm-linears, as in TE's spec."""
    spec = copy.deepcopy(layer_spec(arch, use_te=False))
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = IdentityOp
    layer.self_attention.submodules.linear_qkv = NormedColumnParallelLinear
    layer.mlp.submodules.linear_fc1 = NormedColumnParallelLinear
    return spec
