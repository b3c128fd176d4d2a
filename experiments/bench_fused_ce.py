"""Chunked (fused) linear + cross-entropy vs the plain head + F.cross_entropy: peak memory and tokens/s of
a CLM training step (forward, backward, AdamW) on CPU, side by side in one run.

Each measurement runs in a fresh process (the same seed, weights and batch for both paths): one warm-up
step, then ``--steps`` timed steps; the peak is the growth of the process's peak resident set (ru_maxrss)
over its size before the first step (the model and AdamW state are there for both). Rounds alternate
plain / fused so that the machine's load hits both alike; the figures are medians over rounds, the
ratios fused / plain. CPU time (user + system of the process) is printed beside wall-clock time: on a
shared machine it moves less with the load.

    python experiments/bench_fused_ce.py                      # vocab 32000, seq 1024, batch 2, fp32
    python experiments/bench_fused_ce.py --chunk 1024 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import torch
sys.path.insert(0, sys.argv[1])
a = json.loads(sys.argv[2])
torch.set_num_threads(a["threads"])
from llmforge.objectives.clm import CausalLM
import llmforge.objectives.loss as L
if a["chunk"]:
    L.default_chunk = lambda tokens, vocab, dim: a["chunk"]
model = dict(vocab_size=a["vocab"], d_model=a["d_model"], n_layers=a["layers"], n_heads=a["heads"],
             ffn_hidden=a["ffn"], max_seq_len=a["seq"])
torch.manual_seed(0)
module = CausalLM(model, {"lr": 1e-4}, {"pad": 0}, fused_ce=a["fused"])
opt = torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
g = torch.Generator().manual_seed(1)
tokens = torch.randint(0, a["vocab"], (a["batch"], a["seq"] + 1), generator=g)
batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
def step():
    loss = module.loss(batch)[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())
for p in module.parameters():  # AdamW state and gradients allocated before the baseline
    p.grad = torch.zeros_like(p)
opt.step(); opt.zero_grad(set_to_none=True)
base = rss()
losses, walls, cpus = [step()], [], []
for _ in range(a["steps"]):
    t, c = time.perf_counter(), cpu()
    losses.append(step())
    walls.append(time.perf_counter() - t); cpus.append(cpu() - c)
print(json.dumps({"peak": rss() - base, "wall": sorted(walls)[len(walls) // 2],
                  "cpu": sorted(cpus)[len(cpus) // 2], "loss": losses[0]}))
"""


def measure(args: argparse.Namespace, fused: bool) -> dict:
    spec = dict(vars(args), fused=fused)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", dest="d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=704)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=0, help="tokens per chunk (0: llmforge's default)")
    args = p.parse_args()

    from llmforge.objectives.loss import default_chunk

    tokens = args.batch * args.seq
    chunk = args.chunk or default_chunk(tokens, args.vocab, args.d_model)
    print(
        f"CLM step, vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, batch {args.batch} x "
        f"seq {args.seq} ({tokens} tokens), fp32, {args.threads} threads; fused chunk {chunk} tokens"
    )
    runs: dict[str, list[dict]] = {"plain": [], "fused": []}
    for r in range(args.rounds):
        for name in ("plain", "fused") if r % 2 == 0 else ("fused", "plain"):
            runs[name].append(measure(args, name == "fused"))
            m = runs[name][-1]
            print(
                f"  round {r} {name:<6} peak {m['peak'] / 2**20:8.0f} MiB  step {m['wall']:.2f} s "
                f"(cpu {m['cpu']:.2f} s)  loss {m['loss']:.6f}"
            )
    fields = ("peak", "wall", "cpu")
    med = {k: {f: statistics.median(m[f] for m in v) for f in fields} for k, v in runs.items()}
    assert abs(runs["plain"][0]["loss"] - runs["fused"][0]["loss"]) < 1e-4, "the two paths disagree"
    mem = med["fused"]["peak"] / med["plain"]["peak"]
    speed = med["plain"]["wall"] / med["fused"]["wall"]
    speed_cpu = med["plain"]["cpu"] / med["fused"]["cpu"]
    for k in ("plain", "fused"):
        print(
            f"{k:<6} peak step memory {med[k]['peak'] / 2**20:8.0f} MiB   "
            f"{tokens / med[k]['wall']:8.0f} tokens/s   ({tokens / med[k]['cpu']:.0f} per CPU-second)"
        )
    print(f"fused / plain: peak memory x{mem:.3f}, tokens/s x{speed:.3f} (CPU time x{speed_cpu:.3f})")


if __name__ == "__main__":
    main()
