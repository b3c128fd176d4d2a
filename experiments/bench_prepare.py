"""Data-stage throughput on the demo crawl: (c) end-to-end docs/s per core with the time of each step and
the peak memory at 1x and 4x the corpus; (d) tokenize + write tokens/s vs a raw `Tokenizer.encode_batch` over
the same texts, side by side in one process.

    python experiments/bench_prepare.py [--crawl data/demo-crawl] [--rounds 3]
    python experiments/bench_prepare.py --against /path/to/other/checkout [--pairs 5]

`--against` runs only the process stage of (c), alternating this checkout and the other one (same crawl,
same Python) `--pairs` times, and prints each pair's docs/s ratio and the CPU seconds of all processes.

(c) runs `python -m llmforge.prepare` with one worker (so docs/s is per core) into a fresh directory; the
4x corpus is the demo crawl's files copied four times under new names (every copy is processed in full; the
copies then fall to exact dedup), to show that peak memory does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


MEASURE = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
    "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_utime + r.ru_stime, r.ru_maxrss)"
)


def run_prepare(inputs: str, out: Path, root: Path = ROOT) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB of the largest process, CPU seconds of all its processes), measured
    in a fresh parent, with the llmforge of `root`."""
    cmd = [
        sys.executable,
        "-m",
        "llmforge.prepare",
        f"input={inputs}",
        f"output_dir={out}",
        "executor.workers=1",
        "progress=false",
    ]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], check=True, cwd=root, capture_output=True, text=True, env=env
    )
    cpu, peak = proc.stdout.split()[-2:]
    return time.perf_counter() - start, int(peak) / 1024, float(cpu)


def process_rate(out: Path) -> float:
    stats = json.loads((out / "stats.json").read_text())
    return stats["totals"]["reader"]["documents"] / sum(s["seconds"] for s in stats["shards"])


def compare(crawl: Path, against: Path, pairs: int, tmp: Path) -> None:
    """Process-stage docs/s per core, this checkout vs another, alternating."""
    ratios, rates, cpus = [], {"this": [], "other": []}, {"this": [], "other": []}
    for k in range(pairs):
        for name, root in (("other", against), ("this", ROOT)):
            out = tmp / f"{name}-{k}"
            _, _, cpu = run_prepare(f"{crawl}/*.warc.gz", out, root)
            rates[name].append(process_rate(out))
            cpus[name].append(cpu)
            shutil.rmtree(out)
        ratios.append(rates["this"][-1] / rates["other"][-1])
        print(
            f"pair {k}: this {rates['this'][-1]:.0f} docs/s, other {rates['other'][-1]:.0f} docs/s, "
            f"ratio {ratios[-1]:.3f}; CPU s of the whole command {cpus['this'][-1]:.1f} vs "
            f"{cpus['other'][-1]:.1f}"
        )
    med = statistics.median
    print(
        f"median process-stage docs/s per core: this {med(rates['this']):.0f}, "
        f"other {med(rates['other']):.0f}"
        f" (ratio of medians {med(rates['this']) / med(rates['other']):.3f}, median paired ratio "
        f"{med(ratios):.3f}); median CPU s {med(cpus['this']):.1f} vs {med(cpus['other']):.1f}"
        f" (whole command, docs per CPU-second: ratio {med(cpus['other']) / med(cpus['this']):.3f})"
    )


def bench_steps(crawl: Path, tmp: Path) -> None:
    out = tmp / "c1"
    wall, peak1, _ = run_prepare(f"{crawl}/*.warc.gz", out)
    stats = json.loads((out / "stats.json").read_text())
    totals = stats["totals"]
    shard_seconds = sum(s["seconds"] for s in stats["shards"])
    docs = totals["reader"]["documents"]
    print("(c) end to end, one worker, demo crawl")
    print(f"{'step':<16}{'docs in':>9}{'seconds':>9}{'docs/s':>10}")
    for name, s in totals["steps"].items():
        rate = s["docs_in"] / s["seconds"] if s["seconds"] else float("inf")
        print(f"{name:<16}{s['docs_in']:>9}{s['seconds']:>9.2f}{rate:>10.0f}")
    read_s = shard_seconds - sum(s["seconds"] for s in totals["steps"].values())
    print(f"{'read+sign+write':<16}{docs:>9}{read_s:>9.2f}{docs / read_s:>10.0f}")
    cpu_seconds = sum(s["cpu_seconds"] for s in stats["shards"])
    print(
        f"process stage: {docs} documents in {shard_seconds:.2f} s wall = "
        f"{docs / shard_seconds:.0f} docs/s per core; {cpu_seconds:.2f} CPU s = "
        f"{docs / cpu_seconds:.0f} docs per CPU-second of the worker process, not counting its extraction "
        f"child (target >= 300 per core); "
        f"whole command {wall:.1f} s incl. start-up, dedup, tokenizer, tokenize"
    )
    big = tmp / "crawl4"
    big.mkdir()
    for k in range(4):
        for p in sorted(crawl.glob("*.warc.gz")):
            shutil.copy(p, big / f"copy{k}-{p.name}")
    _, peak4, _ = run_prepare(f"{big}/*.warc.gz", tmp / "c4")
    print(f"peak RSS: 1x corpus {peak1:.0f} MiB, 4x corpus {peak4:.0f} MiB (ratio {peak4 / peak1:.2f})")


def bench_tokenize(dataset: Path, rounds: int) -> None:
    from tokenizers import Tokenizer

    from llmforge.prep.pipeline import kept_documents, load_drop, tokenize_shard

    work = dataset / "work"
    n = len(list((work / "process").glob("*.done")))
    drop = load_drop(work)
    texts = [d.text for i in range(n) for d in kept_documents(work, i, drop)]
    tok = Tokenizer.from_file(str(work / "tokenizer" / "tokenizer.json"))
    cfg = {"val_fraction": 0.05, "shard_tokens": 1 << 26}
    ours, raw, ours_cpu, raw_cpu = [], [], [], []
    tokens = 0
    for r in range(rounds):
        start, cpu = time.perf_counter(), time.process_time()
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        raw.append(tokens / (time.perf_counter() - start))
        raw_cpu.append(tokens / (time.process_time() - cpu))
        out = dataset / f"bench-tok-{r}"
        for p in (work / "tokenize").glob("*.done"):
            p.unlink()  # force the stage to run again
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            tokenize_shard(cfg, str(work), str(out), i)
        ours.append(tokens / (time.perf_counter() - start))
        ours_cpu.append(tokens / (time.process_time() - cpu))
        shutil.rmtree(out)
    o, w = statistics.median(ours), statistics.median(raw)
    oc, wc = statistics.median(ours_cpu), statistics.median(raw_cpu)
    print(f"\n(d) {len(texts)} documents, {tokens:,} tokens, median of {rounds} rounds (alternating)")
    print(f"{'':<28}{'tokens/s':>12}{'tokens/CPU-s':>14}")
    print(f"{'raw encode_batch':<28}{w:>12,.0f}{wc:>14,.0f}")
    print(f"{'llmforge tokenize + write':<28}{o:>12,.0f}{oc:>14,.0f}")
    print(f"ratio {o / w:.2f} wall, {oc / wc:.2f} CPU time (target >= 0.8)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crawl", type=Path, default=ROOT / "data" / "demo-crawl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--against", type=Path, help="another llmforge checkout to compare the process stage with")
    p.add_argument("--pairs", type=int, default=5)
    args = p.parse_args()
    if not list(args.crawl.glob("*.warc.gz")):
        subprocess.run(
            [sys.executable, "-m", "llmforge.prep.demo_warc", str(args.crawl)], check=True, cwd=ROOT
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            compare(args.crawl.resolve(), args.against.resolve(), args.pairs, Path(tmp))
            return
        bench_steps(args.crawl, Path(tmp))
        bench_tokenize(Path(tmp) / "c1", args.rounds)


if __name__ == "__main__":
    main()
