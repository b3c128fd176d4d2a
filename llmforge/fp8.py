"""FP8 training (``precision=fp8-mixed``): torchao float8 linear layers under bf16 autocast.

The matmuls of every transformer block's linear layers (attention projections, SwiGLU, cross-attention)
run in float8 with dynamic scaling (torchao's ``Float8Linear``: inputs and weights in e4m3, output
gradients in e5m2); everything else is ``bf16-mixed``: fp32 master weights and AdamW state, bf16 autocast,
and the head, the embedding, norms, attention scores and the softmax stay in bf16/fp32 (the head's
logits are where FP8's error hurts most; torchtitan leaves its output layer out too). Under
``strategy=fsdp`` the sharded weights are all-gathered already cast to float8 (half of bf16's traffic):
``enable_fsdp_float8_all_gather``, which tensorwise scaling supports.

It needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper and later: float8 tensor cores) and torchao
(``pip install 'llmforge[fp8]'``); elsewhere the run stops before its first step with one line saying why.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

MIN_CAPABILITY = (8, 9)
LIGHTNING_PRECISION = {"fp8-mixed": "bf16-mixed"}  # what Lightning runs under (autocast, FSDP policy)


def lightning_precision(precision: str) -> str:
    """The Lightning precision of an llmforge precision value (``fp8-mixed`` runs as ``bf16-mixed``)."""
    return LIGHTNING_PRECISION.get(precision, precision)


def unsupported_reason(accelerator: str) -> str | None:
    """Why FP8 training cannot run here (one line), or None when it can."""
    if importlib.util.find_spec("torchao") is None:
        return "precision=fp8-mixed needs torchao: pip install 'llmforge[fp8]'"
    if accelerator == "cpu" or not torch.cuda.is_available():
        return (
            "precision=fp8-mixed needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper or later); "
            "this run has none: use precision=bf16-mixed"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        return (
            f"precision=fp8-mixed needs compute capability >= 8.9 (float8 tensor cores); {name} has "
            f"{capability[0]}.{capability[1]}: use precision=bf16-mixed"
        )
    return None


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """Which linear layers become float8: those inside transformer blocks whose shapes float8 matmuls take
    (both dimensions multiples of 16); not the head."""
    if not isinstance(module, nn.Linear) or fqn == "head" or fqn.endswith(".head"):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, fsdp: bool = False) -> nn.Module:
    """Swap the block linear layers of ``model`` for torchao ``Float8Linear`` (tensorwise dynamic scaling),
    in place; with ``fsdp``, float8 all-gather of the sharded weights. Parameter names do not change."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    return convert_to_float8_training(model, config=config, module_filter_fn=fp8_module_filter)
