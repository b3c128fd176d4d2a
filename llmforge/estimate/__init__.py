"""Size, compute, time, memory and money of a pre-training run, before you start it.

``python -m llmforge.estimate model=7b tokens=1e12 gpu=h100 num_gpus=64 [objective=mlm|denoise]`` (keys:
``conf/estimate.yaml``; ``--json`` or ``json=true`` prints one JSON object), or as a library::

    from llmforge.estimate import estimate
    e = estimate("1b", tokens=20e9, num_gpus=8, gpu="a100")
    e.total_flops, e.gpu_hours["a100"], e.memory[0].total_gb
    estimate("1b", domain="specific", corpus_tokens=50e9).recommendation.decision

What is computed, and from where:

- **Parameters** and **FLOPs per token**: `llmforge.models.transformer.num_params` / `flops_per_token`
  (exact counts; FLOPs are PaLM's: 6 x the matmul parameters, plus 12 * layers * d_model * seq_len for
  attention). ``flops_6nd`` is the plain 6 * N * D (Kaplan et al. 2020; GPT-3's 175B x 300B = 3.15e23).
- **Compute-optimal tokens**: 20 per parameter (Hoffmann et al. 2022, Chinchilla: 70B -> 1.4T).
- **GPU-hours** = FLOPs / (bf16 dense peak * MFU); days = GPU-hours / GPUs / 24. The MFU, unless given
  (``mfu=0.45``): the one `experiments/gpu_check.sh` measured on that GPU type at that precision (the 1b
  preset at seq 4096 in the trainer's default GPU configuration; ``cost.MEASURED_MFU``, each figure in
  the ledger), else 0.4 (``FALLBACK_MFU``); the table says which.
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
    runs in 16-bit: s * b * V * (12 + 2) bytes (12 in fp32). That is the plain head
    (``objective.fused_ce=false``). The trainer's default chunked loss (``fused_ce=true``, also the
    estimate's default) computes the gradients in its forward, one chunk of c tokens at a time
    (`memory.fused_head_bytes`): per predicted token the norm's fp32 tensors and three h-vectors at the
    activation dtype (input, gradient, scaled copy); per head weight entry 8 bytes (its fp32 gradient and
    one chunk's fp32 product) plus the 16-bit product and weight copy under mixed precision (12, or 10 in
    bf16-true); c * V * (8 + 2) bytes of chunk logits. With few predicted tokens (one short sequence, or
    mlm's masked share) the weight-sized buffers make it larger than the plain head's.
  * ``objective=mlm`` (encoder): the same blocks; the head and the loss on ``mask_prob`` of the
    positions. ``objective=denoise`` (encoder-decoder, T5 span corruption's input and target lengths
    of a ``seq_len`` window): encoder blocks on the inputs; decoder blocks on the targets, each adding
    cross-attention's ``act * 3h + 4 * (2h + 1 + a)`` per target token and ``act * 2h`` per input token
    (K and V of the encoder output; plus its 16-bit copy under autocast); the encoder output once; the
    head on the targets. Also checked against the saved tensors.
  * the peak is the larger of two moments: the end of the forward / the loss's backward (everything
    above, added up: gradients fill in while activations are freed, so this errs high) and the
    optimizer step (model states, DDP's buckets, and the temporary the foreach AdamW allocates on GPU,
    sqrt(v): half the AdamW states; the trainer uses the foreach AdamW under ``16-mixed`` and the fused
    one, which needs no such list, under the other precisions on CUDA: there the term errs high).
  * not counted: the CUDA context and allocator slack (~1-3 GB), communication buffers, temporary
    buffers inside kernels. Treat ``fits`` as "fits with a little room to spare", not a guarantee.
- **Money**: GPU-hours x the price table (US dollars per GPU-hour; defaults: A100 40 GB on-demand list
  prices of AWS, GCP, Azure and Lambda when the table was written; no default for H100/H200, whose rates
  vary several-fold between providers: ``prices.h100.<provider>=<dollars>``).
- **Recommendation**, only when asked for (``domain=...`` and/or ``budget=...``): the decision tree of
  the course material this project started from ("when to pre-train vs fine-tune"): a general
  need -> use and fine-tune an existing model; a specific domain with < 10B tokens -> fine-tune, > 100B
  -> pre-train, in between -> continue pre-training (the chapter's conclusion: ~10x cheaper than from
  scratch when the domain is not too far); a rare language, proprietary data or a custom architecture ->
  pre-train; and the model size a budget buys (< $10k: fine-tune or 1-3B; $10k-100k: 7-13B; > $1M: 70B+).

Where it lives: `flops` (FLOPs, compute-optimal tokens, GPU-hours), `memory` (memory per GPU), `cost`
(GPU table, prices, the decision tree), `plan` (`estimate` itself and ``conf/estimate.yaml``), `report`
(the printed table); `__main__` is the command line.
"""

from llmforge.estimate.cost import (
    DEFAULT_GPUS,
    DEFAULT_PRICES,
    DOMAINS,
    FALLBACK_MFU,
    MEASURED_MFU,
    Recommendation,
    default_mfu,
    human,
    recommend,
)
from llmforge.estimate.flops import (
    OBJECTIVES,
    TOKENS_PER_PARAM,
    Objective,
    as_objective,
    compute_optimal_tokens,
    gpu_hours,
    training_flops,
)
from llmforge.estimate.memory import (
    GB,
    PRECISION_BYTES,
    STRATEGIES,
    Memory,
    PrecisionBytes,
    activation_bytes_per_token,
    cross_attention_bytes,
    logits_bytes_per_token,
    memory_per_gpu,
    precision_bytes,
)
from llmforge.estimate.plan import (
    CONF,
    Estimate,
    EstimateConfig,
    GPUSpec,
    compose,
    estimate,
    from_config,
    load_preset,
    model_config,
)
from llmforge.estimate.report import format_table

__all__ = [
    "CONF",
    "DEFAULT_GPUS",
    "DEFAULT_PRICES",
    "DOMAINS",
    "FALLBACK_MFU",
    "GB",
    "MEASURED_MFU",
    "OBJECTIVES",
    "PRECISION_BYTES",
    "STRATEGIES",
    "TOKENS_PER_PARAM",
    "Estimate",
    "EstimateConfig",
    "GPUSpec",
    "Memory",
    "Objective",
    "PrecisionBytes",
    "Recommendation",
    "activation_bytes_per_token",
    "as_objective",
    "compose",
    "compute_optimal_tokens",
    "cross_attention_bytes",
    "default_mfu",
    "estimate",
    "format_table",
    "from_config",
    "gpu_hours",
    "load_preset",
    "logits_bytes_per_token",
    "memory_per_gpu",
    "model_config",
    "precision_bytes",
    "recommend",
    "human",
    "training_flops",
]
