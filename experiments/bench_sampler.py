"""Sampler memory and speed: the Feistel `GlobalCursorSampler` at 1e9 windows vs numpy's permutation.

A run over 1e12 tokens has ~5e8 windows; a sampler that builds ``permutation(n)`` per epoch holds 8n bytes
per rank (4 GB at 5e8). Each case runs in a fresh process and reports its peak RSS above the baseline
after imports (``ru_maxrss``) and indices per second:

- ``feistel-batched``: ``GlobalCursorSampler.orders`` on global batches of 1024 positions (what the
  sampler's ``__iter__`` computes per batch), 1e6 indices from a 1e9-window source, starting mid-epoch;
- ``feistel-iter``: the same through ``iter(sampler)`` one index at a time (what a DataLoader pulls);
- ``mixture``: `MixtureSampler` over two sources of 7e8 and 3e8 windows (weights 0.7/0.3);
Indices per second are given in wall-clock and per CPU second of the process (the figure that holds on a
shared machine). ``numpy-permutation``'s time includes building the permutation (what a sampler pays each
epoch).

- ``numpy-permutation``: ``np.random.default_rng(seed).permutation(n)`` then 1e6 lookups, at the
  largest n this machine holds comfortably (``--numpy-n``, default 1e8: 800 MB) and, for the memory figure,
  what the same array would need at 1e9 (8 GB, not allocated).

    python experiments/bench_sampler.py [--n 1e9 --draws 1e6 --numpy-n 1e8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(name: str, n: int, draws: int) -> dict:
    import numpy as np

    from llmforge.data.dataset import GlobalCursorSampler
    from llmforge.data.mixture import MixtureSampler

    base = rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    if name == "feistel-batched":
        sampler = GlobalCursorSampler(n, 1024, seed=1, start=n // 2)
        total = 0
        for first in range(n // 2, n // 2 + draws, 1024):
            total += sampler.orders(np.arange(first, first + 1024)).size
    elif name == "feistel-iter":
        sampler = GlobalCursorSampler(n, 1024, seed=1, start=n // 2)
        total = sum(1 for _ in islice(iter(sampler), draws))
    elif name == "mixture":
        sampler = MixtureSampler([int(0.7 * n), int(0.3 * n)], [0.7, 0.3], 1024, seed=1, start=n // 2)
        total = sum(1 for _ in islice(iter(sampler), draws))
    elif name == "numpy-permutation":
        perm = np.random.default_rng(1).permutation(n)
        positions = np.arange(n // 2, n // 2 + draws) % n
        total = perm[positions].size
    else:
        raise ValueError(name)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "case": name,
        "n": n,
        "draws": total,
        "seconds": seconds,
        "per_s": total / seconds,
        "per_cpu_s": total / cpu,
        "rss_mib": rss_mib() - base,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=1e9)
    p.add_argument("--draws", type=float, default=1e6)
    p.add_argument("--numpy-n", type=float, default=1e8)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case in this process
    args = p.parse_args()
    n, draws = int(args.n), int(args.draws)
    if args.case:
        print(json.dumps(case(args.case, n, draws)))
        return
    rows = []
    for name, size in (
        ("feistel-batched", n),
        ("feistel-iter", n),
        ("mixture", n),
        ("numpy-permutation", int(args.numpy_n)),
    ):
        out = subprocess.run(
            [sys.executable, __file__, "--case", name, "--n", str(size), "--draws", str(draws)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'case':<20} {'windows':>12} {'draws':>9} {'indices/s':>12} {'per CPU s':>12} {'RSS MiB':>8}")
    for r in rows:
        print(
            f"{r['case']:<20} {r['n']:>12.3g} {r['draws']:>9} {r['per_s']:>12,.0f} "
            f"{r['per_cpu_s']:>12,.0f} {r['rss_mib']:>8.1f}"
        )
    numpy = rows[-1]
    print(
        f"numpy permutation at n={n:.3g} would hold {8 * n / 2**20:,.0f} MiB per rank per epoch "
        f"(measured {numpy['rss_mib']:.0f} MiB at n={numpy['n']:.3g})"
    )
    for r in rows[:3]:
        print(
            f"{r['case']}: RSS {r['rss_mib']:.1f} MiB (target < 50), {r['per_s']:.3g} indices/s wall, "
            f"{r['per_cpu_s']:.3g} per CPU second (target >= 1e6), "
            f"vs numpy permutation + lookups {r['per_cpu_s'] / numpy['per_cpu_s']:.2f}x (CPU time)"
        )


if __name__ == "__main__":
    main()
