"""What the benchmarks against Hugging Face models share: the command-line knobs, a `Side` (one model,
its optimizer and its loss), alternating timed rounds, the report with the ratios, and per-op profiles.

Absolute CPU figures drift ~14% between processes (docs/architecture.md), so both models live in one
process and are timed in alternating rounds (the side that goes first alternates too) after warm-up
steps. The reported figure is the median over rounds of tokens/s, with the median of per-round ratios and
a CPU-time ratio beside it; rounds where this process got well under its threads' worth of CPU (other
load on a shared machine) are flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmforge.objectives.base import param_groups
from llmforge.training import keep_freed_memory

# (model, batch) -> (logits, targets): the loss is the fp32 cross-entropy of the two, outside the model
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def add_common_args(p: argparse.ArgumentParser, rounds: int) -> None:
    """The knobs every benchmark against HF has: model shape, batch, rounds, threads, optimizer, profile."""
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both",
                   help="fp32, or bf16 autocast (weights and optimizer stay fp32); both: one after the other")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model per round")
    p.add_argument("--rounds", type=int, default=rounds, help="alternating timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before the rounds")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--no-keep-freed-memory", action="store_true",
                   help="do not call llmforge.training.keep_freed_memory() (glibc mallopt)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the benchmark, profile N steps of each model (interleaved): per-op times")


def setup(args: argparse.Namespace) -> str:
    """keep_freed_memory and the thread count as asked; the transformers version (exits without it)."""
    if not args.no_keep_freed_memory:
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import transformers
    except ImportError:
        sys.exit("this benchmark needs transformers: pip install -e '.[hf]'")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads "
          f"{torch.get_num_threads()}, keep_freed_memory={'off' if args.no_keep_freed_memory else 'on'}")
    return transformers.__version__


class Side:
    """One model, its optimizer (torch AdamW over llmforge's ``param_groups``) and its loss."""

    def __init__(self, name: str, model: nn.Module, loss_fn: LossFn, args: argparse.Namespace, bf16: bool):
        self.name, self.model, self.loss_fn, self.bf16 = name, model, loss_fn, bf16
        model.train()
        self.opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95))
        self.tokens_per_step = args.batch * args.seq_len
        self.rates: list[float] = []  # tokens / wall second, per round
        self.cpu_ms: list[float] = []  # process CPU milliseconds per step, per round
        self.cpu_use: list[float] = []  # process CPU seconds / wall seconds per round (~threads if alone)
        self.last_loss = float("nan")

    def step(self, batch: Any) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            logits, targets = self.loss_fn(self.model, batch)
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=-100)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def run(self, batches: list, start: int, n: int) -> float:
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


def timed_rounds(sides: list[Side], batches: list, args: argparse.Namespace) -> dict[str, float]:
    """Warm-up steps, then ``args.rounds`` alternating rounds of ``args.steps`` steps per side; prints each
    round and the report, and returns the medians and ratios (the first side over the second)."""
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
    med = [statistics.median(s.rates) for s in sides]
    print(f"\n  {'model':<10} {'median tok/s':>13} {'min':>7} {'max':>7} {'ms/step':>8} {'cpu-ms/step':>12} "
          f"{'last loss':>10}")
    for s, m in zip(sides, med, strict=True):
        print(f"  {s.name:<10} {m:13.0f} {min(s.rates):7.0f} {max(s.rates):7.0f} "
              f"{1000 * s.tokens_per_step / m:8.1f} {statistics.median(s.cpu_ms):12.1f} {s.last_loss:10.4f}")
    per_round = [a / b for a, b in zip(sides[0].rates, sides[1].rates, strict=True)]
    ratio, paired = med[0] / med[1], statistics.median(per_round)
    cpu_ratio = statistics.median(sides[1].cpu_ms) / statistics.median(sides[0].cpu_ms)
    print(f"  ratio {sides[0].name}/{sides[1].name} = {ratio:.3f}   (median of per-round ratios "
          f"{paired:.3f}; by CPU time per step {cpu_ratio:.3f})")
    print("  per-round ratios: " + ", ".join(f"{x:.3f}" for x in per_round))
    busy = [r + 1 for r in range(args.rounds)
            if min(sides[0].cpu_use[r], sides[1].cpu_use[r]) < 0.8 * torch.get_num_threads()]
    if busy:
        print(f"  NOTE: rounds {busy} ran with under 80% of {torch.get_num_threads()} threads busy: other "
              "load on the machine; trust the paired / CPU-time ratios more than absolute tok/s")
    return {"ours": med[0], "hf": med[1], "ratio": ratio, "paired": paired, "cpu_ratio": cpu_ratio}


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


def profile(sides: list[Side], batches: list, n: int, how: str = "wall", top: int = 30) -> None:
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
            batch = batches[i % len(batches)]
            if how == "wall":
                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    s.step(batch)
                events = prof.key_averages()
                per_step[s.name].append({ev.key: ev.self_cpu_time_total / 1000 for ev in events})
                calls[s.name].update({ev.key: ev.count for ev in events})
            else:
                rec = _OpCPUTime()
                t0 = time.thread_time_ns()
                with rec.mode:
                    s.step(batch)
                rec.ms["(whole step, incl. Python)"] = (time.thread_time_ns() - t0) / 1e6
                per_step[s.name].append(rec.ms)
                calls[s.name].update(rec.calls)

    def med(name: str, key: str) -> float:
        return statistics.median(step.get(key, 0.0) for step in per_step[name])

    a, b = (s.name for s in sides)
    keys = set(calls[a]) | set(calls[b])
    ms = {name: {k: med(name, k) for k in keys} for name in (a, b)}
    names = sorted(keys, key=lambda k: -max(ms[a][k], ms[b][k]))
    wall = "wall ms inside each op (torch.profiler self CPU)"
    what = wall if how == "wall" else "thread CPU ms per aten op"
    print(f"\n--- profile, {n} steps per model interleaved, threads {torch.get_num_threads()}: {what} "
          "per step, median over steps (calls per step) ---")
    print(f"  {'op':<52} {a:>16} {b:>16} {'diff':>8}")
    for k in names[:top]:
        print(f"  {k[:52]:<52} {ms[a][k]:9.1f} ({calls[a].get(k, 0):4d}) "
              f"{ms[b][k]:9.1f} ({calls[b].get(k, 0):4d}) {ms[a][k] - ms[b][k]:+8.1f}")
    ta = statistics.median(sum(v for k, v in step.items() if not k.startswith("(")) for step in per_step[a])
    tb = statistics.median(sum(v for k, v in step.items() if not k.startswith("(")) for step in per_step[b])
    print(f"  {'sum over ops (median over steps)':<52} {ta:9.1f}        {tb:9.1f}        {ta - tb:+8.1f}")
    if how == "cpu":
        wa, wb = med(a, "(whole step, incl. Python)"), med(b, "(whole step, incl. Python)")
        print(f"  {'whole step, thread CPU (median)':<52} {wa:9.1f}        {wb:9.1f}        {wa - wb:+8.1f}")
