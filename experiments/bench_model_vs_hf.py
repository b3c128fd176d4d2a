#!/usr/bin/env python
"""Steady-state CPU training throughput: llmforge ``Transformer`` vs Hugging Face ``LlamaForCausalLM``.

Both models are built with the same shape (vocab, d_model, layers, heads, SwiGLU hidden = our
``cfg.hidden``, untied head, equal RoPE theta and RMSNorm eps, HF attention = "sdpa"), start from the SAME
weights (ours are copied into HF's separate q/k/v and gate/up matrices, and the logits are checked to agree),
train on the same token batches with the same loss (fp32 cross-entropy over shifted labels, computed
outside the model) and the same optimizer (torch AdamW, llmforge's ``param_groups``: weight decay on matmul
weights only).

Absolute CPU figures drift ~14% between processes (ARCHITECTURE.md), so both models live in one process
and are timed in alternating rounds (the side that goes first alternates too), after warm-up steps. The
reported figure is the median over rounds of tokens/s, with the median of per-round ratios and a CPU-time
ratio beside it. The project's 2-core machines are shared: rounds where this process got well under its
threads' worth of CPU are flagged. For a comparison that other load barely moves, use
``--threads 1 --profile N --profile-clock cpu`` (thread CPU time per aten op, median over steps).
A default run takes ~2-2.5 minutes on 2 cores when the machine is not oversubscribed.

    .venv/bin/python experiments/bench_model_vs_hf.py                  # fp32 and bf16, defaults
    .venv/bin/python experiments/bench_model_vs_hf.py --dtype bf16 --rounds 7 --steps 8
    .venv/bin/python experiments/bench_model_vs_hf.py --dtype fp32 --profile 8   # + per-op table
    .venv/bin/python experiments/bench_model_vs_hf.py --threads 1 --profile 8 --profile-clock cpu
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from llmforge.models.transformer import Transformer, TransformerConfig, num_params
from llmforge.objectives.base import param_groups
from llmforge.training import keep_freed_memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="fp32, or bf16 autocast (weights and optimizer stay fp32); both: one after the other",
    )
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model per round")
    p.add_argument("--rounds", type=int, default=8, help="alternating timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: = heads)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument(
        "--no-keep-freed-memory",
        action="store_true",
        help="do not call llmforge.training.keep_freed_memory() (glibc mallopt)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after the benchmark, profile N steps of each model (interleaved) and print per-op times",
    )
    p.add_argument(
        "--profile-clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: torch.profiler; cpu: thread CPU time per aten op, robust to other load (use --threads 1)",
    )
    return p.parse_args(argv)


# -- models ---------------------------------------------------------------------------------------------
def build_ours(args: argparse.Namespace) -> Transformer:
    cfg = TransformerConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        max_seq_len=max(args.seq_len, 2048),
        tie_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return Transformer(cfg)


def build_hf(cfg: TransformerConfig, args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attention_dropout=0.0,
    )
    try:  # transformers >= 5: RoPE settings live in rope_parameters
        hf_cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, **common)
    except TypeError:
        hf_cfg = LlamaConfig(rope_theta=cfg.rope_theta, **common)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(hf_cfg)
    model.config._attn_implementation = "sdpa"
    return model


@torch.no_grad()
def copy_weights(ours: Transformer, hf: nn.Module) -> None:
    """Ours -> HF: split the fused qkv and gate_up matrices back into Llama's separate ones."""
    cfg = ours.cfg
    d, kv, h = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.hidden
    hm = hf.model
    hm.embed_tokens.weight.copy_(ours.embed.weight)
    hm.norm.weight.copy_(ours.norm.weight)
    hf.lm_head.weight.copy_(ours.head.weight)
    for blk, layer in zip(ours.blocks, hm.layers, strict=True):
        q, k, v = blk.attn.qkv.weight.split([d, kv, kv], dim=0)
        layer.self_attn.q_proj.weight.copy_(q)
        layer.self_attn.k_proj.weight.copy_(k)
        layer.self_attn.v_proj.weight.copy_(v)
        layer.self_attn.o_proj.weight.copy_(blk.attn.out.weight)
        gate, up = blk.mlp.gate_up.weight.split(h, dim=0)
        layer.mlp.gate_proj.weight.copy_(gate)
        layer.mlp.up_proj.weight.copy_(up)
        layer.mlp.down_proj.weight.copy_(blk.mlp.down.weight)
        layer.input_layernorm.weight.copy_(blk.attn_norm.weight)
        layer.post_attention_layernorm.weight.copy_(blk.mlp_norm.weight)


def logits_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Transformer):
        return model(tokens)
    return model(input_ids=tokens, use_cache=False).logits


# -- training side ----------------------------------------------------------------------------------------
class Side:
    """One model, its optimizer and its step function."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace, autocast: bool) -> None:
        self.name, self.model, self.autocast = name, model, autocast
        model.train()
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
        self.tokens_per_step = args.batch * args.seq_len
        self.rates: list[float] = []  # tokens / wall second, per round
        self.cpu_ms: list[float] = []  # process CPU milliseconds per step, per round
        self.cpu_use: list[float] = []  # process CPU seconds / wall seconds per round (~threads if alone)
        self.last_loss = float("nan")

    def step(self, window: torch.Tensor) -> torch.Tensor:
        inputs, labels = window[:, :-1], window[:, 1:]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            logits = logits_of(self.model, inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, batches: list[torch.Tensor], start: int, n: int) -> float:
        """n steps; returns the elapsed seconds (and records CPU use, which flags other load on the box)."""
        gc.collect()
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            loss = self.step(batches[(start + i) % len(batches)])
        elapsed = time.perf_counter() - t0  # CPU ops are synchronous: nothing is pending here
        cpu = time.process_time() - c0
        self.cpu_use.append(cpu / elapsed)
        self.cpu_ms.append(1000 * cpu / max(n, 1))
        self.last_loss = float(loss)
        return elapsed


def bench(args: argparse.Namespace, dtype: str, batches: list[torch.Tensor]) -> dict[str, float]:
    ours = build_ours(args)
    hf = build_hf(ours.cfg, args)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    print(
        f"\n=== {dtype}  (batch {args.batch} x seq {args.seq_len} = {args.batch * args.seq_len} tokens/step, "
        f"{args.warmup} warm-up + {args.rounds} rounds x {args.steps} steps per model) ==="
    )
    print(f"parameters: llmforge {n_ours:,}  HF {n_hf:,}  (num_params(cfg) = {num_params(ours.cfg):,})")
    if n_ours != n_hf:
        sys.exit(
            f"parameter counts differ: llmforge {n_ours} vs HF {n_hf}; the models are not the same shape"
        )
    print(
        f"HF attn_implementation={hf.config._attn_implementation!r}, intermediate_size="
        f"{hf.config.intermediate_size} (ours hidden={ours.cfg.hidden})"
    )

    copy_weights(ours, hf)
    with torch.no_grad():
        ours.eval(), hf.eval()
        probe = batches[0][:, :-1]
        lo, lh = logits_of(ours, probe), logits_of(hf, probe)
        diff = (lo - lh).abs().max().item()
    print(f"same weights: max |logits_ours - logits_hf| = {diff:.2e} (fp32 forward)")
    if diff > 1e-3:
        print("WARNING: the two models do not compute the same function", file=sys.stderr)
    del lo, lh

    sides = [Side("llmforge", ours, args, dtype == "bf16"), Side("HF Llama", hf, args, dtype == "bf16")]
    for s in sides:
        s.run(batches, 0, args.warmup)
        s.rates.clear(), s.cpu_ms.clear(), s.cpu_use.clear()  # keep timed rounds only
    cursor = args.warmup
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        line = []
        for s in order:
            sec = s.run(batches, cursor, args.steps)
            s.rates.append(args.steps * s.tokens_per_step / sec)
            line.append(f"{s.name} {s.rates[-1]:7.0f} tok/s (cpu {s.cpu_use[-1]:.2f})")
        cursor += args.steps
        print(f"  round {r + 1}: " + "   ".join(line) + f"   load {os.getloadavg()[0]:.2f}")

    med = {s.name: statistics.median(s.rates) for s in sides}
    print(
        f"\n  {'model':<10} {'median tok/s':>13} {'min':>7} {'max':>7} {'ms/step':>8} {'cpu-ms/step':>12} "
        f"{'last loss':>10}"
    )
    for s in sides:
        print(
            f"  {s.name:<10} {med[s.name]:13.0f} {min(s.rates):7.0f} {max(s.rates):7.0f} "
            f"{1000 * s.tokens_per_step / med[s.name]:8.1f} {statistics.median(s.cpu_ms):12.1f} "
            f"{s.last_loss:10.4f}"
        )
    per_round = [a / b for a, b in zip(sides[0].rates, sides[1].rates, strict=True)]
    ratio = med["llmforge"] / med["HF Llama"]
    paired = statistics.median(per_round)
    cpu_ratio = statistics.median(sides[1].cpu_ms) / statistics.median(sides[0].cpu_ms)
    print(
        f"  ratio llmforge/HF = {ratio:.3f}   (median of per-round ratios {paired:.3f}; "
        f"by CPU time per step {cpu_ratio:.3f})"
    )
    print("  per-round ratios: " + ", ".join(f"{x:.3f}" for x in per_round))
    busy = [
        r + 1
        for r in range(args.rounds)
        if min(sides[0].cpu_use[r], sides[1].cpu_use[r]) < 0.8 * torch.get_num_threads()
    ]
    if busy:
        print(
            f"  NOTE: rounds {busy} ran with under 80% of {torch.get_num_threads()} threads busy: other load "
            "on the machine; trust the paired / CPU-time ratios more than absolute tok/s"
        )

    if args.profile:
        profile(sides, batches, args.profile, args.profile_clock)
    return {
        "ours": med["llmforge"],
        "hf": med["HF Llama"],
        "ratio": ratio,
        "paired": paired,
        "cpu_ratio": cpu_ratio,
    }


class _OpCPUTime:
    """Per aten op, this thread's CPU time (time.thread_time_ns), via a TorchDispatchMode. Unlike wall time
    this barely moves when other processes share the cores; it covers all the work only at --threads 1
    (with more threads the OpenMP workers' share is not counted)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                t0 = time.thread_time_ns()
                out = func(*args, **(kwargs or {}))
                key = f"aten::{func.overloadpacket.__name__}"
                owner.ms[key] = owner.ms.get(key, 0.0) + (time.thread_time_ns() - t0) / 1e6
                owner.calls[key] = owner.calls.get(key, 0) + 1
                return out

        self.mode = Mode()
        self.ms: dict[str, float] = {}
        self.calls: dict[str, int] = {}


def profile(sides: list[Side], batches: list[torch.Tensor], n: int, how: str, top: int = 30) -> None:
    """Profiles n steps per model, interleaved step by step, and prints each op's self time per step,
    side by side, as the MEDIAN over the n steps (robust to bursts of other load on a shared machine).

    how="wall": torch.profiler's self CPU time (wall clock inside each op);
    how="cpu": this thread's CPU time inside each aten op (see _OpCPUTime; use with --threads 1)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    per_step: dict[str, list[dict[str, float]]] = {s.name: [] for s in sides}
    calls: dict[str, dict[str, int]] = {s.name: {} for s in sides}
    for i in range(n):
        for s in sides if i % 2 == 0 else sides[::-1]:
            window = batches[i % len(batches)]
            if how == "wall":
                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    s.step(window)
                events = prof.key_averages()
                per_step[s.name].append({ev.key: ev.self_cpu_time_total / 1000 for ev in events})
                calls[s.name].update({ev.key: ev.count for ev in events})
            else:
                rec = _OpCPUTime()
                t0 = time.thread_time_ns()
                with rec.mode:
                    s.step(window)
                rec.ms["(whole step, incl. Python)"] = (time.thread_time_ns() - t0) / 1e6
                per_step[s.name].append(rec.ms)
                calls[s.name].update(rec.calls)

    def med(name: str, key: str) -> float:
        return statistics.median(step.get(key, 0.0) for step in per_step[name])

    a, b = (s.name for s in sides)
    keys = set(calls[a]) | set(calls[b])
    ms = {name: {k: med(name, k) for k in keys} for name in (a, b)}
    names = sorted(keys, key=lambda k: -max(ms[a][k], ms[b][k]))
    what = (
        "wall ms inside each op (torch.profiler self CPU)" if how == "wall" else "thread CPU ms per aten op"
    )
    print(
        f"\n--- profile, {n} steps per model interleaved, threads {torch.get_num_threads()}: {what} "
        "per step, median over steps (calls per step) ---"
    )
    print(f"  {'op':<52} {a:>16} {b:>16} {'diff':>8}")
    for k in names[:top]:
        print(
            f"  {k[:52]:<52} {ms[a][k]:9.1f} ({calls[a].get(k, 0):4d}) "
            f"{ms[b][k]:9.1f} ({calls[b].get(k, 0):4d}) {ms[a][k] - ms[b][k]:+8.1f}"
        )
    ta = statistics.median(sum(v for k, v in step.items() if not k.startswith("(")) for step in per_step[a])
    tb = statistics.median(sum(v for k, v in step.items() if not k.startswith("(")) for step in per_step[b])
    print(f"  {'sum over ops (median over steps)':<52} {ta:9.1f}        {tb:9.1f}        {ta - tb:+8.1f}")
    if how == "cpu":
        wa, wb = med(a, "(whole step, incl. Python)"), med(b, "(whole step, incl. Python)")
        print(f"  {'whole step, thread CPU (median)':<52} {wa:9.1f}        {wb:9.1f}        {wa - wb:+8.1f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.no_keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"keep_freed_memory={'off' if args.no_keep_freed_memory else 'on'}"
    )
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        sys.exit("this benchmark needs transformers (pip install transformers)")

    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen) for _ in range(4)]
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    results = {d: bench(args, d, batches) for d in dtypes}
    print(
        "\nsummary: "
        + "; ".join(
            f"{d}: llmforge {r['ours']:.0f} tok/s, HF {r['hf']:.0f} tok/s, ratio {r['ratio']:.3f} "
            f"(paired {r['paired']:.3f}, cpu-time {r['cpu_ratio']:.3f})"
            for d, r in results.items()
        )
    )


if __name__ == "__main__":
    main()
