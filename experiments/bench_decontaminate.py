"""Decontamination step speed: documents per second per core of `DecontaminateFilter` on the demo crawl.

The demo crawl's documents after extraction and cleaning (``data/demo/work/process/*.jsonl.gz``, from
``python -m llmforge.prepare``) are checked against the index of the shipped ``llmforge_stdlib`` task (and
any others given); one process, one thread, CPU time.

    .venv/bin/python experiments/bench_decontaminate.py [--data data/demo] [--tasks llmforge_stdlib]
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from llmforge.prep.decontaminate import DecontaminateFilter, build_index
from llmforge.prep.document import Document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--tasks", default="llmforge_stdlib")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = sorted((Path(args.data) / "work" / "process").glob("*.jsonl.gz"))
    if not files:
        raise SystemExit(f"no kept documents under {args.data}/work/process: run python -m llmforge.prepare")
    docs = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [Document.from_json(json.loads(line)) for line in fh]
    start = time.process_time()
    index = build_index(args.tasks.split(","))
    build_s = time.process_time() - start
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "i.npz", **index)
        best = float("inf")
        for _ in range(args.rounds):
            f = DecontaminateFilter(index=str(Path(tmp) / "i.npz"))  # a fresh word cache each round
            start = time.process_time()
            dropped = sum(not f.filter(d)[0] for d in docs)
            best = min(best, time.process_time() - start)
    chars = sum(len(d.text) for d in docs)
    print(
        f"{len(docs)} documents ({chars / len(docs) / 1000:.1f}k chars avg), index of {len(index['hashes'])} "
        f"n-grams from {args.tasks} (built in {build_s:.1f} s CPU): {len(docs) / best:.0f} docs/s per core, "
        f"{dropped} dropped"
    )


if __name__ == "__main__":
    main()
