"""Memory per GPU of a training run: model states, DDP buckets or FSDP units in flight, activations
(with or without activation checkpointing), the head and loss (the logits, or the chunked head's working
set with ``objective.fused_ce``) and the optimizer step's temporaries (formulas in
the `llmforge.estimate` docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmforge.estimate.flops import Objective, as_objective
from llmforge.models.transformer import TransformerConfig, num_params

GB = 1e9
STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class PrecisionBytes:
    """Bytes per parameter of each model state, and per element of activations."""

    weights: int  # the stored parameters (fp32 master weights under mixed precision)
    working: int  # 16-bit working copy of the weights (mixed precision only)
    grads: int
    optim: int  # AdamW exp_avg + exp_avg_sq
    act: int  # activations between matmuls
    residual: int  # the residual stream (what a checkpointed block keeps)

    @property
    def gather(self) -> int:
        """dtype FSDP gathers the weights in (its MixedPrecisionPolicy param_dtype)."""
        return self.working or self.weights


PRECISION_BYTES = {
    "32-true": PrecisionBytes(weights=4, working=0, grads=4, optim=8, act=4, residual=4),
    "bf16-mixed": PrecisionBytes(weights=4, working=2, grads=4, optim=8, act=2, residual=4),
    "16-mixed": PrecisionBytes(weights=4, working=2, grads=4, optim=8, act=2, residual=4),
    "bf16-true": PrecisionBytes(weights=2, working=0, grads=2, optim=4, act=2, residual=2),
    # float8 linears under bf16-mixed: the same states; float8 copies are transient (an upper bound)
    "fp8-mixed": PrecisionBytes(weights=4, working=2, grads=4, optim=8, act=2, residual=4),
}


@dataclass
class Memory:
    """Bytes per GPU for one strategy, with or without activation checkpointing."""

    strategy: str
    activation_checkpointing: bool
    weights: float
    working_copy: float
    grads: float
    optimizer: float
    comm: float  # ddp: gradient buckets; fsdp: unsharded units in flight
    activations: float
    logits: float
    step_temp: float  # the optimizer step's temporaries (foreach AdamW)
    peak: str  # "backward" | "optimizer step": when the total is reached
    parts: dict[str, float]  # what is in memory at that moment (adds up to total)
    total: float
    total_gb: float
    fits: bool  # total <= the chosen GPU's memory


def precision_bytes(precision: str) -> PrecisionBytes:
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    return PRECISION_BYTES[precision]


def activation_bytes_per_token(cfg: TransformerConfig, precision: str) -> float:
    """Bytes one block saves for its backward, per token of the micro-batch (formula in the module doc)."""
    b = precision_bytes(precision)
    h, k, f, a = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.hidden, cfg.n_heads
    v = h + 2 * k if k == h else 2 * h
    return b.act * (2 * h + (h + k) + v + h + 4 * f) + 4 * (4 * h + 2 + a)


def cross_attention_bytes(cfg: TransformerConfig, precision: str) -> tuple[float, float]:
    """(bytes per decoder token, bytes per encoder token) one decoder block's cross-attention saves:
    its norm (input and normalised input in fp32, 1/rms), the query input, queries and output; the
    encoder-side K and V (expanded to every head), and under autocast the 16-bit copy of the encoder
    output each block's K/V projection casts."""
    b = precision_bytes(precision)
    h, a = cfg.d_model, cfg.n_heads
    cast = b.act if b.working else 0
    return b.act * 3 * h + 4 * (2 * h + 1 + a), b.act * 2 * h + cast * h


def logits_bytes_per_token(cfg: TransformerConfig, precision: str) -> float:
    """Peak bytes of the head and the loss per token, reached in the loss's backward: the fp32
    log-probabilities the loss saved, their gradient and the gradient of the fp32 logits (12 bytes per
    vocabulary entry), plus the gradient's 16-bit cast when the head runs in 16-bit (the final norm's
    saved tensors and the head's input included)."""
    b = precision_bytes(precision)
    cast = b.act if b.act != 4 else 0
    return cfg.vocab_size * (12 + cast) + 4 * 2 * cfg.d_model + b.act * cfg.d_model


def fused_head_bytes(cfg: TransformerConfig, precision: str, tokens: float) -> float:
    """Peak bytes of the chunked head and loss (``objective.fused_ce``, `llmforge.objectives.loss`) over
    ``tokens`` predicted positions, as its forward computes the gradients chunk by chunk:

    - per token: the final norm's saved tensors, the head's input, the input gradient the forward keeps
      and its scaled copy in backward;
    - per head weight entry: the fp32 weight gradient it accumulates, one chunk's contribution to it (in the
      compute dtype, then fp32), and the weight's 16-bit copy under mixed precision;
    - one chunk (`default_chunk` tokens) x vocabulary: fp32 logits (their gradient in place), the
      log-sum-exp's temporary, and the 16-bit matmul output.
    """
    from llmforge.objectives.loss import default_chunk

    b = precision_bytes(precision)
    d, v = cfg.d_model, cfg.vocab_size
    cast = b.act if b.act != 4 else 0  # a 16-bit compute copy
    chunk = default_chunk(max(int(tokens), 1), v, d)
    per_token = 4 * 2 * d + 3 * b.act * d
    per_weight = 4 + 4 + cast + (cast if b.working else 0)
    return tokens * per_token + v * d * per_weight + chunk * v * (8 + cast)


def memory_per_gpu(
    cfg: TransformerConfig,
    *,
    strategy: str,
    num_gpus: int,
    precision: str,
    seq_len: int,
    batch_size: int,
    activation_checkpointing: bool,
    gpu_memory_gb: float = math.inf,
    objective: str | Mapping[str, Any] | Objective = "clm",
) -> Memory:
    """Bytes per GPU for training `cfg` with AdamW (formulas in the module docstring). ``objective``:
    ``clm`` (decoder), ``mlm`` (encoder; the head on the masked share of the positions) or ``denoise``
    (encoder-decoder on T5 span corruption's input and target lengths of a ``seq_len`` window)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus} must be >= 1")
    b = precision_bytes(precision)
    obj = as_objective(objective)
    arch = obj.arch
    n = num_params(cfg, arch=arch)
    shard = num_gpus if strategy == "fsdp" else 1
    weights, grads, optim = n * b.weights / shard, n * b.grads / shard, n * b.optim / shard
    if strategy == "ddp":
        working = n * b.working
        comm = n * b.grads if num_gpus > 1 else 0.0  # DDP's bucketed copy of the gradients
    else:
        working = 0.0
        block = _block_params(cfg) + (_cross_params(cfg) if arch == "encdec" else 0)  # the largest block
        root = n - cfg.n_layers * _block_params(cfg)
        root -= cfg.decoder_layers * (_block_params(cfg) + _cross_params(cfg)) if arch == "encdec" else 0
        comm = (root + 2 * block) * b.gather + max(root, block) * b.grads if num_gpus > 1 else 0.0
    inputs, targets = (x * batch_size for x in obj.lengths(seq_len))
    per_token = activation_bytes_per_token(cfg, precision)
    per_layer = per_token * inputs  # an encoder / decoder-only block
    kept = cfg.d_model * b.residual  # what a checkpointed block keeps per token: its input
    if arch == "encdec":
        cross_target, cross_memory = cross_attention_bytes(cfg, precision)
        dec_layer = (per_token + cross_target) * targets + cross_memory * inputs
        memory_out = inputs * kept  # the encoder's output, read by every decoder block
        if activation_checkpointing:
            activations = (cfg.n_layers * inputs + cfg.decoder_layers * targets) * kept + memory_out
            activations += max(per_layer, dec_layer)
        else:
            activations = cfg.n_layers * per_layer + cfg.decoder_layers * dec_layer + memory_out
    elif activation_checkpointing:
        activations = cfg.n_layers * kept * inputs + per_layer
    else:
        activations = cfg.n_layers * per_layer
    predicted = obj.predicted(seq_len) * batch_size
    if obj.fused_ce:
        logits = fused_head_bytes(cfg, precision, predicted)
    else:
        logits = logits_bytes_per_token(cfg, precision) * predicted
    step_temp = optim / 2  # foreach AdamW's sqrt(exp_avg_sq) list
    backward = weights + working + grads + optim + comm + activations + logits
    step = weights + grads + optim + (comm if strategy == "ddp" else 0.0) + step_temp
    total = max(backward, step)
    if backward >= step:
        parts = dict(weights=weights, working_copy=working, grads=grads, optimizer=optim, comm=comm)
        parts |= dict(activations=activations, logits=logits)
    else:
        parts = dict(weights=weights, grads=grads, optimizer=optim, step_temp=step_temp)
        parts |= dict(comm=comm) if strategy == "ddp" else {}
    return Memory(
        strategy=strategy,
        activation_checkpointing=activation_checkpointing,
        weights=weights,
        working_copy=working,
        grads=grads,
        optimizer=optim,
        comm=comm,
        activations=activations,
        logits=logits,
        step_temp=step_temp,
        peak="backward" if backward >= step else "optimizer step",
        parts=parts,
        total=total,
        total_gb=total / GB,
        fits=total <= gpu_memory_gb * GB,
    )


def _block_params(cfg: TransformerConfig) -> int:
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    return d * (d + 2 * kv) + d * d + 3 * d * cfg.hidden + 2 * d


def _cross_params(cfg: TransformerConfig) -> int:
    d, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
    return d * d + d * 2 * kv + d * d + d
