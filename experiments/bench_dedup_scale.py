"""Dedup at scale: the bounded-memory tasks (llmforge.prep.dedup_tasks) on synthetic shard signature files
of 1 M to 30 M documents: wall time, CPU time and peak resident memory of every task, disk per stage, with 1
and 2 worker processes; and, up to `--check-docs`, the drop list compared byte for byte with
`find_duplicates`.

    .venv/bin/python experiments/bench_dedup_scale.py [--docs 1000000 10000000] [--workers 1 2]
        [--memory-gb 1] [--num-perm 128 --bands 16 --rows 8] [--dir /tmp/dedup-scale] [--keep-corpus]

Synthetic corpus: shards of `--shard-docs` documents with random signatures (uint32, as MinHasher's affine32)
and planted families: 5% of the documents are near copies of one of n/100 family templates (each value kept
with probability 0.9-1.0, so members of a family have estimated Jaccard ~0.8-1 with each other, across
shards), 2% are exact copies of a template (same exact hash and signature). Peak RSS per task is the
process's high-water mark (VmHWM, file-backed pages of memory-mapped files included), reset before each
task through /proc/self/clear_refs, so it is the task's own peak even in a reused worker process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from llmforge.prep.dedup import find_duplicates, load_signatures, write_signatures
from llmforge.prep.dedup_tasks import make_plan, run_dedup

CONFIG = {"ngram": 3, "seed": 1, "scheme": "affine32"}


def make_corpus(root: Path, docs: int, shard_docs: int, num_perm: int, seed: int = 0) -> list[Path]:
    """Shard signature files with planted near and exact families (see the module docstring)."""
    rng = np.random.default_rng(seed)
    families = max(1, docs // 100)
    template = rng.integers(0, 2**32, size=(families, num_perm), dtype=np.uint32)
    template_exact = rng.integers(0, 2**64, size=families, dtype=np.uint64)
    paths = []
    for s, lo in enumerate(range(0, docs, shard_docs)):
        n = min(shard_docs, docs - lo)
        sig = rng.integers(0, 2**32, size=(n, num_perm), dtype=np.uint32)
        exact = rng.integers(0, 2**64, size=n, dtype=np.uint64)
        kind = rng.random(n)
        near = np.flatnonzero(kind < 0.05)
        fam = rng.integers(0, families, size=len(near))
        keep = rng.random((len(near), num_perm)) < rng.uniform(0.9, 1.0, size=(len(near), 1))
        sig[near] = np.where(keep, template[fam], sig[near])
        copies = np.flatnonzero((kind >= 0.05) & (kind < 0.07))
        fam = rng.integers(0, families, size=len(copies))
        sig[copies], exact[copies] = template[fam], template_exact[fam]
        path = root / f"{s:05d}.sig.npz"
        write_signatures(path, np.arange(n), exact, sig, CONFIG | {"num_perm": num_perm})
        paths.append(path)
    return paths


def measured(fn, *args):
    """Run one task, with this process's peak-RSS mark reset first: (result, peak RSS MiB, seconds, CPU s)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    start, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    status = Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    if not hwm:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, hwm / 1024, time.perf_counter() - start, time.process_time() - cpu


class MeasuringExecutor:
    """Like LocalExecutor, but every stage runs in a fresh pool of `workers` spawned processes (a single
    task too, so the driver's own memory is never counted), and each task reports its own peak RSS, wall
    and CPU time."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.stages: list[dict] = []

    def map(self, fn, args, label="", **_):  # every task runs: the benchmark starts from empty directories
        start = time.perf_counter()
        with ProcessPoolExecutor(min(self.workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
            out = list(pool.map(measured, *zip(*[(fn, *a) for a in args], strict=True)))
        self.stages.append(
            {
                "stage": label.removeprefix("dedup-"),
                "tasks": len(out),
                "wall_s": time.perf_counter() - start,
                "cpu_s": sum(o[3] for o in out),
                "peak_rss_mib": max(o[1] for o in out),
                "spilled_mib": max((o[0].get("spilled_bytes", 0) for o in out), default=0) / 2**20,
            }
        )
        return [o[0] for o in out]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tasks", type=int, default=0, help="tasks per stage (0: the number of workers)")
    ap.add_argument("--memory-gb", type=float, default=1.0)
    ap.add_argument("--num-perm", type=int, default=128)
    ap.add_argument("--bands", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--shard-docs", type=int, default=500_000)
    ap.add_argument("--check-docs", type=int, default=1_000_000, help="compare with find_duplicates up to")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/dedup-scale-bench"))
    ap.add_argument("--json", type=Path, default=None, help="append the results to this file")
    ap.add_argument("--keep-corpus", action="store_true", help="keep the signature files, reuse kept ones")
    args = ap.parse_args()

    rows = []
    for docs in args.docs:
        root = args.dir / f"{docs}"
        corpus = {"docs": docs, "shard_docs": args.shard_docs, "num_perm": args.num_perm, "seed": 0}
        kept = root / "sig" / "corpus.json"
        t0 = time.perf_counter()
        if args.keep_corpus and kept.exists() and json.loads(kept.read_text()) == corpus:
            paths = sorted((root / "sig").glob("*.sig.npz"))
            for work in root.glob("work-*"):
                shutil.rmtree(work)
        else:
            shutil.rmtree(root, ignore_errors=True)
            paths = make_corpus(root / "sig", docs, args.shard_docs, args.num_perm)
            kept.write_text(json.dumps(corpus))
        sig_bytes = du(root / "sig")
        print(
            f"\n{docs:,} documents: {len(paths)} shard files, {sig_bytes / 2**30:.2f} GiB of signatures "
            f"({time.perf_counter() - t0:.0f} s to write)",
            flush=True,
        )
        drops = {}
        for workers in args.workers:
            work = root / f"work-w{workers}"
            plan = make_plan(
                work,
                paths,
                threshold=args.threshold,
                bands=args.bands,
                rows=args.rows,
                tasks=args.tasks or workers,
                memory_gb=args.memory_gb,
            )
            ex = MeasuringExecutor(workers)
            t0 = time.perf_counter()
            result, _ = run_dedup(plan, ex)
            wall = time.perf_counter() - t0
            disk = {d: du(work / d) for d in ("exact", "candidates", "verified")}
            disk["final"] = sum((work / f).stat().st_size for f in ("drop.npy", "removed.npz"))
            drops[workers] = result
            print(
                f"  {workers} worker(s), {plan.tasks} tasks a stage, memory_gb={args.memory_gb}: "
                f"{wall:.0f} s wall; dropped {result.exact_dropped:,} exact + {result.near_dropped:,} near; "
                f"{result.candidate_pairs:,} candidate pairs, {result.verified_pairs:,} verified",
                flush=True,
            )
            print(
                f"    {'stage':10s} {'tasks':>5s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>12s} "
                f"{'spill MiB':>9s} {'disk MiB':>9s}"
            )
            for st in ex.stages:
                name = {"buckets": "candidates", "verify": "verified", "components": "final"}.get(
                    st["stage"], st["stage"]
                )
                st["disk_mib"] = disk.get(name, 0) / 2**20
                print(
                    f"    {st['stage']:10s} {st['tasks']:5d} {st['wall_s']:8.1f} {st['cpu_s']:8.1f} "
                    f"{st['peak_rss_mib']:12.0f} {st['spilled_mib']:9.0f} {st['disk_mib']:9.0f}"
                )
            rows.append(
                {
                    "docs": docs,
                    "workers": workers,
                    "tasks": plan.tasks,
                    "memory_gb": args.memory_gb,
                    "num_perm": args.num_perm,
                    "wall_s": wall,
                    "signature_bytes": sig_bytes,
                    "stages": ex.stages,
                    "exact_dropped": result.exact_dropped,
                    "near_dropped": result.near_dropped,
                }
            )
        first = drops[args.workers[0]]
        same = all(r.drop.tobytes() == first.drop.tobytes() for r in drops.values())
        print(f"  drop lists identical across worker counts: {same}")
        if docs <= args.check_docs:
            t0 = time.perf_counter()
            keys, exact, sigs = load_signatures(paths)
            ref = find_duplicates(
                keys, exact, sigs, threshold=args.threshold, bands=args.bands, rows=args.rows
            )
            del keys, exact, sigs
            ident = (
                ref.drop.tobytes() == first.drop.tobytes()
                and ref.kept_for.tobytes() == first.kept_for.tobytes()
            )
            print(
                f"  find_duplicates (one process, {time.perf_counter() - t0:.0f} s, peak RSS of this process "
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB): drop list and "
                f"survivors byte-identical: {ident}",
                flush=True,
            )
        for work in root.glob("work-*"):
            shutil.rmtree(work)
        if not args.keep_corpus:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(rows) + "\n")
    os.sync()


if __name__ == "__main__":
    main()
