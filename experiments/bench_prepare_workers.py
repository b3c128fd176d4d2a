"""Data-stage start-up: 1 vs 2 workers on the demo crawl split in two shards, and a no-op rerun.

    python experiments/bench_prepare_workers.py [--crawl data/demo-crawl] [--rounds 3] [--baseline DIR]

The demo crawl's four WARC files are joined pairwise into two (gzip members concatenate), so the process
and tokenize stages have two tasks each: with 2 workers each worker takes one. Each round runs, into fresh
directories, `python -m llmforge.prepare` with `executor.workers=1` and with `executor.workers=2`, then a
no-op rerun of the finished 2-worker dataset; the order of the two fresh runs alternates per round. Wall
time and CPU time (user + sys of the whole process tree) are medians over rounds. `--baseline DIR` runs the
same commands with another checkout first on PYTHONPATH (e.g. the code before a change), side by side in
the same rounds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# CPU time of every process of the run, also those no parent waits for (a fork server and its workers):
# a cgroup v1 cpuacct group of its own where there is one (root), else getrusage of the waited children.
MEASURE = """
import os, resource, subprocess, sys
group = f"/sys/fs/cgroup/cpuacct/llmforge-bench-{os.getpid()}"
try:
    os.mkdir(group)
    with open(f"{group}/tasks", "w") as f:
        f.write(str(os.getpid()))
except OSError:
    group = None
subprocess.run(sys.argv[1:], check=True, capture_output=True)
if group:
    with open("/sys/fs/cgroup/cpuacct/tasks", "w") as f:
        f.write(str(os.getpid()))
    usage = int(open(f"{group}/cpuacct.usage").read()) / 1e9
    os.rmdir(group)
    print("cgroup", usage)
else:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    print("rusage", r.ru_utime + r.ru_stime)
"""


def split_in_two(crawl: Path, out: Path) -> Path:
    files = sorted(crawl.glob("*.warc.gz"))
    half = (len(files) + 1) // 2
    out.mkdir(parents=True)
    for k, group in enumerate((files[:half], files[half:])):
        with open(out / f"half-{k}.warc.gz", "wb") as dst:
            for f in group:
                dst.write(f.read_bytes())
    return out


def prepare(code: Path, crawl: Path, out: Path, workers: int) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of one prepare run with `code` first on PYTHONPATH, started in
    the output's parent (Hydra's run directory goes there, not into the checkout)."""
    cmd = [
        sys.executable, "-m", "llmforge.prepare", f"input={crawl}/*.warc.gz", f"output_dir={out}",
        f"executor.workers={workers}", "progress=false",
    ]
    env = os.environ | {"PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, cwd=out.parent, env=env,
                          capture_output=True, text=True)
    return time.perf_counter() - start, float(proc.stdout.split()[-1])  # the last line: "how seconds"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crawl", type=Path, default=ROOT / "data" / "demo-crawl")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, help="another checkout to compare with (e.g. main before)")
    args = p.parse_args()
    if not list(args.crawl.glob("*.warc.gz")):
        demo = [sys.executable, "-m", "llmforge.prep.demo_warc", str(args.crawl)]
        subprocess.run(demo, check=True, cwd=ROOT)
    sides = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        crawl = split_in_two(args.crawl, Path(tmp) / "crawl")
        for r in range(args.rounds):
            for side, code in sides.items():
                order = (1, 2) if r % 2 == 0 else (2, 1)
                for workers in order:
                    out = Path(tmp) / f"{side}-{r}-w{workers}"
                    runs.setdefault((side, f"fresh, {workers} worker(s)"), []).append(
                        prepare(code, crawl, out, workers)
                    )
                done = Path(tmp) / f"{side}-{r}-w2"
                runs.setdefault((side, "no-op rerun"), []).append(prepare(code, crawl, done, 2))
                for w in (1, 2):
                    shutil.rmtree(Path(tmp) / f"{side}-{r}-w{w}")
    load = os.getloadavg()[0]
    print(f"demo crawl in 2 shards, median of {args.rounds} rounds; load average now {load:.1f} "
          "(CPU s = user + sys of the process tree)")
    print(f"{'code':<10}{'run':<26}{'wall s':>9}{'CPU s':>9}")
    for (side, what), values in runs.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{side:<10}{what:<26}{wall:>9.2f}{cpu:>9.2f}")
    for side in sides:
        one = statistics.median(v[0] for v in runs[(side, "fresh, 1 worker(s)")])
        two = statistics.median(v[0] for v in runs[(side, "fresh, 2 worker(s)")])
        print(f"{side}: 2 workers vs 1: {one / two:.2f}x faster (wall)")


if __name__ == "__main__":
    main()
