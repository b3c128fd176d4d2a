"""Size, compute, time, memory and money of a pre-training run, before you start it.

``python -m llmforge.estimate model=7b tokens=1e12 gpu=h100 num_gpus=64 [objective=mlm|denoise]`` (keys:
``conf/estimate.yaml``; ``--json`` or ``json=true`` prints one JSON object), or as a library::

    from llmforge.estimate import estimate
    e = estimate("1b", tokens=20e9, num_gpus=8, gpu="a100")
    e.total_flops, e.gpu_hours["a100"], e.memory[0].total_gb, e.recommendation.decision

What is computed, and from where:

- **Parameters** and **FLOPs per token**: `llmforge.models.transformer.num_params` / `flops_per_token`
  (exact counts; FLOPs are PaLM's: 6 x the matmul parameters, plus 12 * layers * d_model * seq_len for
  attention). ``flops_6nd`` is the plain 6 * N * D (Kaplan et al. 2020; GPT-3's 175B x 300B = 3.15e23).
- **Compute-optimal tokens**: 20 per parameter (Hoffmann et al. 2022, Chinchilla: 70B -> 1.4T).
- **GPU-hours** = FLOPs / (bf16 dense peak * MFU); days = GPU-hours / GPUs / 24.
- **Memory per GPU** (`memory`), for ``ddp`` and ``fsdp`` over ``num_gpus`` GPUs, with and without
  activation checkpointing, in bytes:

  * model states per parameter (AdamW): ``32-true`` weights 4 + gradients 4 + AdamW m, v 8 = 16;
    ``bf16-mixed``/``16-mixed`` fp32 master weights 4 + gradients 4 (Lightning keeps fp32 gradients) +
    AdamW 8, plus a 16-bit working copy 2 (the casts autocast keeps for the backward; FSDP gathers in
    16-bit instead) = 18; ``bf16-true`` weights 2 + gradients 2 + AdamW states 4 (in the weights' dtype)
    = 8. ZeRO (Rajbhandari et al. 2020) counts 16 for mixed precision: the same, minus the working copy.
  * ``ddp``: every GPU holds all of it, plus DDP's gradient buckets (one more copy of the gradients:
    Lightning's default ``gradient_as_bucket_view=False``) when there is more than one GPU.
  * ``fsdp`` (FSDP2 ``fully_shard`` per block, ZeRO-3): model states / num_gpus, plus the unsharded units
    in flight: the root (embedding, head, final norm, kept from forward to backward) and two blocks
    (the current one and the prefetched next one) in the gather dtype, and one unit's unsharded
    gradients before their reduce-scatter.
  * activations: counted per block the way Korthikanti et al. 2022 ("Reducing Activation Recomputation
    in Large Transformer Models", section 4) count them for GPT (34 * s * b * h bytes + 5 * a * s^2 * b
    without flash attention), but for this Llama block: the tensors autograd saves, per token of the
    micro-batch (h = d_model, k = kv_heads * head_dim, f = ffn hidden, a = heads, act = 2 bytes in
    16-bit, 4 in fp32)::

        act * (2h [the two norm outputs, inputs of the QKV and gate/up matmuls]
               + (h + k) [Q and K after RoPE] + v [V: (h + 2k) with MHA, the fused QKV output it is a
               view of; 2h with GQA, K and V expanded to every head] + h [attention output]
               + 4f [gate and up, silu(gate), their product])
        + 4 * (4h + 2 + a) [each RMSNorm keeps its input and the normalised input in fp32, and 1/rms;
                            the attention's log-sum-exp]

    (checked against the tensors PyTorch saves in ``tests/test_estimate.py``). Fused attention
    (SDPA flash / memory-efficient) stores no s x s matrix. With activation checkpointing (per block)
    each block keeps only its input (h at the residual stream's dtype: fp32 under mixed precision), and
    one block's activations are recomputed at a time. The loss peaks in its backward: the fp32
    log-probabilities, their gradient and the fp32 logits' gradient, plus its 16-bit cast when the head
    runs in 16-bit: s * b * V * (12 + 2) bytes (12 in fp32).
  * ``objective=mlm`` (encoder): the same blocks; the head and the loss on ``mask_prob`` of the
    positions. ``objective=denoise`` (encoder-decoder, T5 span corruption's input and target lengths
    of a ``seq_len`` window): encoder blocks on the inputs; decoder blocks on the targets, each adding
    cross-attention's ``act * 3h + 4 * (2h + 1 + a)`` per target token and ``act * 2h`` per input token
    (K and V of the encoder output; plus its 16-bit copy under autocast); the encoder output once; the
    head on the targets. Also checked against the saved tensors.
  * the peak is the larger of two moments: the end of the forward / the loss's backward (everything
    above, added up: gradients fill in while activations are freed, so this errs high) and the
    optimizer step (model states, DDP's buckets, and the temporary the default foreach AdamW allocates
    on GPU, sqrt(v): half the AdamW states; Lightning's AMP plugins refuse the fused AdamW).
  * not counted: the CUDA context and allocator slack (~1-3 GB), communication buffers, temporary
    buffers inside kernels. Treat ``fits`` as "fits with a little room to spare", not a guarantee.
- **Money**: GPU-hours x the price table (US dollars per GPU-hour; defaults: the seed chapter's cloud
  table, A100 40 GB; no default price for H100/H200, which the seed does not quote).
- **Recommendation**: the seed chapter's decision tree ("Quand pré-entraîner vs fine-tuner ?"): a general
  need -> use and fine-tune an existing model; a specific domain with < 10B tokens -> fine-tune, > 100B
  -> pre-train, in between -> continue pre-training (the chapter's conclusion: ~10x cheaper than from
  scratch when the domain is not too far); a rare language, proprietary data or a custom architecture ->
  pre-train; and the model size a budget buys (< $10k: fine-tune or 1-3B; $10k-100k: 7-13B; > $1M: 70B+).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmforge.config import DenoiseConfig, MaskedLMConfig, ObjectiveConfig, PrecisionConfig
from llmforge.models.transformer import TransformerConfig, flops_per_token, num_params

CONF = Path(__file__).resolve().parent.parent / "conf"
TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio
GB = 1e9

DEFAULT_GPUS: dict[str, dict[str, float]] = {
    "a100": {"peak_tflops": 312.0, "memory_gb": 40.0},
    "h100": {"peak_tflops": 989.0, "memory_gb": 80.0},
    "h200": {"peak_tflops": 989.0, "memory_gb": 141.0},
}
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "a100": {"aws": 4.00, "gcp": 3.67, "azure": 3.40, "lambda": 1.10},  # seed chapter, A100 40 GB
    "h100": {},
    "h200": {},
}
OBJECTIVES = {"clm": "decoder", "mlm": "encoder", "denoise": "encdec"}
DOMAINS = ("general", "specific", "rare_language", "proprietary", "custom_architecture")
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


@dataclass
class Recommendation:
    decision: str  # "pre-train" | "continue pre-training" | "fine-tune"
    model_size: str  # what the budget buys, from the seed's tree
    reasons: list[str]


@dataclass
class Estimate:
    model: str
    objective: str  # clm | mlm | denoise: decoder, encoder or encoder-decoder
    config: dict[str, Any]
    params: int
    non_embedding_params: int
    seq_len: int
    tokens: float
    tokens_per_param: float
    flops_per_token: float  # PaLM: 6 x matmul parameters + attention
    flops_per_token_6n: float
    total_flops: float
    total_flops_6nd: float
    compute_optimal_tokens: float
    gpu: str
    num_gpus: int
    mfu: float
    precision: str
    batch_size: int
    gpu_hours: dict[str, float]  # per GPU type in the table
    days: float  # on num_gpus of `gpu`
    cost: dict[str, dict[str, float]]  # gpu -> provider -> US dollars
    memory: list[Memory]
    recommendation: Recommendation
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# -- the formulas --------------------------------------------------------------------------------------
def training_flops(params: float, tokens: float) -> float:
    """6 * N * D: forward (2) and backward (4) FLOPs per parameter per token."""
    return 6.0 * params * tokens


def compute_optimal_tokens(params: float) -> float:
    """Chinchilla's rule of thumb: about 20 training tokens per parameter."""
    return TOKENS_PER_PARAM * params


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def activation_bytes_per_token(cfg: TransformerConfig, precision: str) -> float:
    """Bytes one block saves for its backward, per token of the micro-batch (formula in the module doc)."""
    b = _precision(precision)
    h, k, f, a = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.hidden, cfg.n_heads
    v = h + 2 * k if k == h else 2 * h
    return b.act * (2 * h + (h + k) + v + h + 4 * f) + 4 * (4 * h + 2 + a)


def cross_attention_bytes(cfg: TransformerConfig, precision: str) -> tuple[float, float]:
    """(bytes per decoder token, bytes per encoder token) one decoder block's cross-attention saves:
    its norm (input and normalised input in fp32, 1/rms), the query input, queries and output; the
    encoder-side K and V (expanded to every head), and under autocast the 16-bit copy of the encoder
    output each block's K/V projection casts."""
    b = _precision(precision)
    h, a = cfg.d_model, cfg.n_heads
    cast = b.act if b.working else 0
    return b.act * 3 * h + 4 * (2 * h + 1 + a), b.act * 2 * h + cast * h


def logits_bytes_per_token(cfg: TransformerConfig, precision: str) -> float:
    """Peak bytes of the head and the loss per token, reached in the loss's backward: the fp32
    log-probabilities the loss saved, their gradient and the gradient of the fp32 logits (12 bytes per
    vocabulary entry), plus the gradient's 16-bit cast when the head runs in 16-bit (the final norm's
    saved tensors and the head's input included)."""
    b = _precision(precision)
    cast = b.act if b.act != 4 else 0
    return cfg.vocab_size * (12 + cast) + 4 * 2 * cfg.d_model + b.act * cfg.d_model


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
    b = _precision(precision)
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


@dataclass(frozen=True)
class Objective:
    """The training objective's shape-relevant knobs (defaults: the objective group's)."""

    name: str = "clm"
    mask_prob: float = MaskedLMConfig.mask_prob  # mlm: share of the positions the head runs on
    variant: str = DenoiseConfig.variant  # denoise: span (T5) | infill (BART)
    noise_density: float = DenoiseConfig.noise_density
    mean_span_length: float = DenoiseConfig.mean_span_length

    @property
    def arch(self) -> str:
        return OBJECTIVES[self.name]

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(encoder or decoder-only input, decoder input) lengths for a window of seq_len corpus tokens."""
        if self.name != "denoise":
            return seq_len, 0
        if self.variant != "span":
            return seq_len, seq_len
        from llmforge.objectives.denoise import span_lengths  # imports Lightning: only for this objective

        return span_lengths(seq_len, self.noise_density, self.mean_span_length)

    def predicted(self, seq_len: int) -> float:
        """Positions per window the head and the loss run on."""
        return {"clm": seq_len, "mlm": seq_len * self.mask_prob, "denoise": self.lengths(seq_len)[1]}[
            self.name
        ]


def as_objective(objective: str | Mapping[str, Any] | Objective) -> Objective:
    """A name (clm, mlm, denoise), a mapping such as a composed objective group, or an Objective."""
    if isinstance(objective, Objective):
        result = objective
    elif isinstance(objective, str):
        result = Objective(name=objective)
    else:
        known = set(Objective.__dataclass_fields__)
        result = Objective(**{k: v for k, v in objective.items() if k in known})
    if result.name not in OBJECTIVES:
        raise ValueError(f"objective={result.name!r} is not one of {', '.join(OBJECTIVES)}")
    return result


def recommend(
    *, corpus_tokens: float, domain: str, budget: float | None, cost: float | None, params: float
) -> Recommendation:
    """The seed chapter's decision tree (see the module docstring)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is not one of {', '.join(DOMAINS)}")
    reasons: list[str] = []
    if domain == "general":
        decision = "fine-tune"
        reasons.append("no need for a custom model: start from an existing pre-trained model")
    elif domain == "specific":
        if corpus_tokens < 10e9:
            decision = "fine-tune"
            reasons.append(f"specific domain, corpus {_num(corpus_tokens)} tokens < 10B: fine-tune")
        elif corpus_tokens > 100e9:
            decision = "pre-train"
            reasons.append(f"specific domain, corpus {_num(corpus_tokens)} tokens > 100B: pre-train")
        else:
            decision = "continue pre-training"
            reasons.append(
                f"specific domain, corpus {_num(corpus_tokens)} tokens between 10B and 100B: continue "
                "pre-training an existing model (~10x cheaper than from scratch if the domain is close)"
            )
    else:
        decision = "pre-train"
        why = {
            "rare_language": "a rare language: existing models handle it poorly",
            "proprietary": "proprietary or sensitive data: full control, no leak",
            "custom_architecture": "a custom architecture: nothing to start from",
        }[domain]
        reasons.append(f"{why}: pre-train")
    if budget is None:
        size = "no budget given"
    elif budget < 10e3:
        size = "fine-tune, or a small model (1-3B)"
    elif budget <= 100e3:
        size = "7-13B"
    elif budget < 1e6:
        size = "13-70B (the seed's tree is silent between $100k and $1M)"
    else:
        size = "70B+"
    if budget is not None:
        reasons.append(f"budget ${_num(budget)}: {size}")
        if cost is not None and decision == "pre-train" and cost > budget:
            reasons.append(
                f"this plan costs ${_num(cost)} (cheapest price for the chosen GPU), over the budget: "
                "fewer tokens, a smaller model, or continue pre-training instead"
            )
    optimal = compute_optimal_tokens(params)
    if decision == "pre-train" and corpus_tokens < optimal:
        epochs = optimal / corpus_tokens
        reasons.append(
            f"the corpus has {corpus_tokens / params:.1f} tokens per parameter (< {TOKENS_PER_PARAM:.0f}): "
            f"compute-optimal training repeats it {epochs:.1f} times (up to ~4 epochs cost little, "
            "Muennighoff et al. 2023), or pick a smaller model"
        )
    return Recommendation(decision=decision, model_size=size, reasons=reasons)


# -- the estimate ----------------------------------------------------------------------------------------
def load_preset(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml as a dict."""
    from omegaconf import OmegaConf

    path = CONF / "model" / f"{name}.yaml"
    if not path.exists():
        presets = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ValueError(f"model={name!r} is not a preset: choose one of {', '.join(presets)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def model_config(model: str | TransformerConfig | Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """A preset name, a config or a dict of `TransformerConfig` fields, with overrides applied."""
    if isinstance(model, TransformerConfig):
        raw = asdict(model)
    elif isinstance(model, str):
        raw = load_preset(model)
    else:
        raw = dict(model)
    known = set(TransformerConfig.__dataclass_fields__)
    for key in [*raw, *overrides]:
        if key not in known:
            raise ValueError(f"model.{key} is not a model key: choose from {', '.join(sorted(known))}")
    raw.update(overrides)
    cfg = TransformerConfig(**raw)
    if cfg.vocab_size is None:
        raise ValueError(
            f"model.vocab_size is null in model={cfg.name} (taken from the data when training): "
            "give it, e.g. model.vocab_size=32000"
        )
    return cfg


def estimate(
    model: str | TransformerConfig | Mapping[str, Any] = "7b",
    *,
    tokens: float | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    num_gpus: int = 8,
    gpu: str = "h100",
    mfu: float = 0.4,
    precision: str = "bf16-mixed",
    objective: str | Mapping[str, Any] | Objective = "clm",
    corpus_tokens: float | None = None,
    budget: float | None = None,
    domain: str = "general",
    gpus: Mapping[str, Mapping[str, float]] | None = None,
    prices: Mapping[str, Mapping[str, float]] | None = None,
    **model_overrides: Any,
) -> Estimate:
    """Everything `python -m llmforge.estimate` prints, as a dataclass (see the module docstring)."""
    cfg = model_config(model, **model_overrides)
    gpus = {k: dict(v) for k, v in (gpus if gpus is not None else DEFAULT_GPUS).items()}
    prices = {  # a null price: not known
        k: {p: x for p, x in (v or {}).items() if x is not None}
        for k, v in (prices if prices is not None else DEFAULT_PRICES).items()
    }
    if gpu not in gpus:
        raise ValueError(f"gpu={gpu!r} is not one of {', '.join(gpus)} (add it under gpus.{gpu})")
    for name, spec in gpus.items():
        if set(spec) != {"peak_tflops", "memory_gb"}:
            raise ValueError(f"gpus.{name} needs exactly peak_tflops and memory_gb, got {sorted(spec)}")
    for name, by_provider in prices.items():
        if name not in gpus:
            raise ValueError(f"prices.{name}: no such GPU in gpus ({', '.join(gpus)})")
        for provider, price in by_provider.items():
            if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
                raise ValueError(f"prices.{name}.{provider}={price!r} is not a price in dollars per GPU-hour")
    _precision(precision)
    seq_len = seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    for key, value in (("batch_size", batch_size), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")

    obj = as_objective(objective)
    arch = obj.arch
    n = num_params(cfg, arch=arch)
    optimal = compute_optimal_tokens(n)
    tokens = float(tokens) if tokens is not None else optimal
    if tokens <= 0:
        raise ValueError(f"tokens={tokens} must be positive")
    if arch == "encdec":  # per corpus token: the encoder on the inputs, the decoder on the targets
        inputs, targets = obj.lengths(seq_len)
        fpt = flops_per_token(cfg, inputs, arch=arch, target_len=targets) * inputs / seq_len
    else:
        predicted = obj.predicted(seq_len) if arch == "encoder" else None
        fpt = flops_per_token(cfg, seq_len, arch=arch, predicted=predicted)
    total = fpt * tokens
    hours = {name: gpu_hours(total, spec["peak_tflops"], mfu) for name, spec in gpus.items()}
    cost = {name: {p: hours[name] * price for p, price in prices.get(name, {}).items()} for name in gpus}
    chosen_costs = list(cost.get(gpu, {}).values())
    memory = [
        memory_per_gpu(
            cfg,
            strategy=strategy,
            num_gpus=num_gpus,
            precision=precision,
            seq_len=seq_len,
            batch_size=batch_size,
            activation_checkpointing=ckpt,
            gpu_memory_gb=gpus[gpu]["memory_gb"],
            objective=obj,
        )
        for strategy in STRATEGIES
        for ckpt in (False, True)
    ]
    corpus = float(corpus_tokens) if corpus_tokens is not None else tokens
    rec = recommend(
        corpus_tokens=corpus,
        domain=domain,
        budget=budget,
        cost=min(chosen_costs) if chosen_costs else None,
        params=n,
    )
    notes = []
    if arch != "decoder":
        notes.append(
            "compute-optimal tokens: Chinchilla's 20 per parameter was fitted on decoder-only models"
        )
    if not chosen_costs:
        notes.append(f"no price for {gpu}: set prices.{gpu}.<provider>=<dollars per GPU-hour>")
    return Estimate(
        model=cfg.name,
        objective=obj.name,
        config=asdict(cfg),
        params=n,
        non_embedding_params=num_params(cfg, include_embedding=False, arch=arch),
        seq_len=seq_len,
        tokens=tokens,
        tokens_per_param=tokens / n,
        flops_per_token=fpt,
        flops_per_token_6n=6.0 * n,
        total_flops=total,
        total_flops_6nd=training_flops(n, tokens),
        compute_optimal_tokens=optimal,
        gpu=gpu,
        num_gpus=num_gpus,
        mfu=mfu,
        precision=precision,
        batch_size=batch_size,
        gpu_hours=hours,
        days=hours[gpu] / num_gpus / 24.0,
        cost=cost,
        memory=memory,
        recommendation=rec,
        notes=notes,
    )


def _precision(precision: str) -> PrecisionBytes:
    if precision not in PRECISION_BYTES:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISION_BYTES)}")
    return PRECISION_BYTES[precision]


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


# -- the table -------------------------------------------------------------------------------------------
def format_table(e: Estimate) -> str:
    c = e.config
    shape = (
        f"d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads"
        + (f" ({c['n_kv_heads']} kv)" if c["n_kv_heads"] else "")
        + f", ffn {TransformerConfig(**c).hidden}, vocab {c['vocab_size']}"
    )
    lines = [
        f"model {e.model} ({OBJECTIVES[e.objective]}, objective={e.objective}): {shape}",
        f"  parameters            {_num(e.params)} ({e.params:,}; {_num(e.non_embedding_params)} without "
        "the embedding)",
        f"  FLOPs per token       {e.flops_per_token:.3g} (6N + attention at seq_len {e.seq_len}; 6N = "
        f"{e.flops_per_token_6n:.3g})",
        f"  tokens                {_num(e.tokens)} ({e.tokens_per_param:.1f} per parameter; "
        f"compute-optimal: {_num(e.compute_optimal_tokens)})",
        f"  total FLOPs           {e.total_flops:.3g} (6ND: {e.total_flops_6nd:.3g})",
        "",
        f"compute at MFU {e.mfu:.0%} (bf16 dense peak)",
    ]
    for name, hours in e.gpu_hours.items():
        mark = " <-" if name == e.gpu else ""
        days = hours / e.num_gpus / 24
        lines.append(f"  {name:<6} {_num(hours):>8} GPU-hours   {days:8.1f} days on {e.num_gpus} GPUs{mark}")
    lines += ["", "money (US dollars, GPU-hours x price per GPU-hour)"]
    for name, by_provider in e.cost.items():
        if by_provider:
            parts = ", ".join(f"{p} ${_num(v)}" for p, v in sorted(by_provider.items(), key=lambda kv: kv[1]))
        else:
            parts = f"n/a (no price: prices.{name}.<provider>=...)"
        lines.append(f"  {name:<6} {parts}")
    lines += [
        "",
        f"memory per GPU, GB ({e.precision}, {e.num_gpus} x {e.gpu}, micro-batch {e.batch_size} x "
        f"{e.seq_len} tokens, AdamW)",
        f"  {'strategy':<13}{'weights':>9}{'16-bit':>8}{'grads':>8}{'AdamW':>8}{'comm':>8}{'activ.':>9}"
        f"{'logits':>8}{'total':>9}  fits  peak at",
    ]
    for m in e.memory:
        name = m.strategy + (" + ckpt" if m.activation_checkpointing else "")
        cells = (m.weights, m.working_copy, m.grads, m.optimizer, m.comm, m.activations, m.logits)
        widths = (9, 8, 8, 8, 8, 9, 8)
        row = "".join(f"{v / GB:>{w}.1f}" for v, w in zip(cells, widths, strict=True))
        fits = "yes" if m.fits else "no"
        lines.append(f"  {name:<13}{row}{m.total_gb:>9.1f}  {fits:<4}  {m.peak}")
    lines.append(
        "  (comm: DDP gradient buckets / FSDP unsharded units in flight; ckpt: activation checkpointing "
        "per block; a peak at the optimizer step adds foreach AdamW's temporary, half the AdamW column; "
        "CUDA context and allocator slack not included)"
    )
    r = e.recommendation
    lines += ["", f"recommendation: {r.decision}"]
    lines += [f"  - {reason}" for reason in r.reasons]
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)


# -- the command line --------------------------------------------------------------------------------------
@dataclass
class GPUSpec:
    peak_tflops: float  # dense bf16
    memory_gb: float


@dataclass
class EstimateConfig:
    """conf/estimate.yaml's schema."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    tokens: float | None = None
    seq_len: int | None = None
    batch_size: int = 1
    num_gpus: int = 8
    gpu: str = "h100"
    mfu: float = 0.4
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig("bf16-mixed"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    corpus_tokens: float | None = None
    budget: float | None = None
    domain: str = "general"
    json: bool = False
    gpus: dict[str, GPUSpec] = field(default_factory=dict)
    prices: dict[str, Any] = field(default_factory=dict)  # gpu -> provider -> dollars per GPU-hour


def compose(overrides: list[str]) -> Any:
    """conf/estimate.yaml composed with command-line style overrides (``model=1b tokens=2e10 ...``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from llmforge.config import register

    register()  # the objective group's schemas
    ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="estimate", overrides=overrides)


def from_config(cfg: Any) -> Estimate:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c["precision"] = c["precision"]["value"]
    return estimate(c.pop("model"), **{k: v for k, v in c.items() if k != "json"})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__.split("What is computed")[0].strip())
        print("\nkeys (conf/estimate.yaml):", ", ".join(EstimateConfig.__dataclass_fields__))
        return 0
    if "--json" in args:
        args = [a for a in args if a != "--json"] + ["json=true"]
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(args)
        result = from_config(cfg)
    except MissingConfigException as err:  # model=<no such preset>, precision=<no such option>
        options = ", ".join(err.options or [])
        print(
            f"error: {str(err).splitlines()[0]}" + (f"; options: {options}" if options else ""),
            file=sys.stderr,
        )
        return 2
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        text = f"{err}" + (f": {err.__cause__}" if err.__cause__ else "")
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        print("error: " + ("\n  ".join(lines) or type(err).__name__), file=sys.stderr)
        return 2
    print(result.to_json() if cfg.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
