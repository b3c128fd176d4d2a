"""The table `python -m llmforge.estimate` prints."""

from __future__ import annotations

from llmforge.estimate.cost import human
from llmforge.estimate.flops import OBJECTIVES
from llmforge.estimate.memory import GB
from llmforge.estimate.plan import Estimate
from llmforge.models.transformer import TransformerConfig


def format_table(e: Estimate) -> str:
    c = e.config
    shape = (
        f"d_model {c['d_model']}, {c['n_layers']} layers, {c['n_heads']} heads"
        + (f" ({c['n_kv_heads']} kv)" if c["n_kv_heads"] else "")
        + f", ffn {TransformerConfig(**c).hidden}, vocab {c['vocab_size']}"
    )
    lines = [
        f"model {e.model} ({OBJECTIVES[e.objective]}, objective={e.objective}): {shape}",
        f"  parameters            {human(e.params)} ({e.params:,}; {human(e.non_embedding_params)} without "
        "the embedding)",
        f"  FLOPs per token       {e.flops_per_token:.3g} (6N + attention at seq_len {e.seq_len}; 6N = "
        f"{e.flops_per_token_6n:.3g})",
        f"  tokens                {human(e.tokens)} ({e.tokens_per_param:.1f} per parameter; "
        f"compute-optimal: {human(e.compute_optimal_tokens)})",
        f"  total FLOPs           {e.total_flops:.3g} (6ND: {e.total_flops_6nd:.3g})",
        "",
        f"compute at MFU {e.mfu:.0%} of the bf16 dense peak ({e.mfu_source})",
    ]
    for name, hours in e.gpu_hours.items():
        mark = " <-" if name == e.gpu else ""
        days = hours / e.num_gpus / 24
        other = f" (MFU {e.mfu_by_gpu[name]:.0%})" if e.mfu_by_gpu[name] != e.mfu else ""
        lines.append(
            f"  {name:<6} {human(hours):>8} GPU-hours   {days:8.1f} days on {e.num_gpus} GPUs{other}{mark}"
        )
    lines += ["", "money (US dollars, GPU-hours x price per GPU-hour)"]
    for name, by_provider in e.cost.items():
        if by_provider:
            cheapest_first = sorted(by_provider.items(), key=lambda kv: kv[1])
            parts = ", ".join(f"{p} ${human(v)}" for p, v in cheapest_first)
        else:
            parts = f"n/a (no default price: prices.{name}.<provider>=<dollars per GPU-hour>)"
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
    if r is not None:
        lines += ["", f"recommendation: {r.decision}" if r.decision else "budget"]
        lines += [f"  - {reason}" for reason in r.reasons]
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)
