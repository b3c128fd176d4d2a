"""First verification of a token dataset (`llmforge.data.shards.verify_split`: sha256 + largest token id,
one pass) vs the peer `sha256sum` over the same shard files, side by side; then the cached second open.

    python experiments/bench_verify_shards.py [--gb 1.0] [--rounds 3]

Prints seconds per GB for both and their ratio. The files are in the page cache (just written), so this
is the CPU cost of the check; on a cold disk both sides wait for the same reads.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from llmforge.data.shards import VERIFIED, ShardSet, sha256_file, write_manifest


def make_dataset(directory: Path, gb: float, shard_gb: float = 0.25) -> list[Path]:
    rng = np.random.default_rng(0)
    tokens = int(shard_gb * 2**30) // 2
    shards, files = [], []
    for k in range(max(1, round(gb / shard_gb))):
        path = directory / f"train-{k:05d}.bin"
        rng.integers(0, 32000, size=tokens, dtype=np.uint16).tofile(path)
        np.asarray([tokens], dtype="<i8").tofile(path.with_suffix(".idx"))
        shards.append({"file": path.name, "tokens": tokens, "documents": 1, "sha256": sha256_file(path)})
        files.append(path)
    total = tokens * len(shards)
    splits = {"train": {"tokens": total, "documents": len(shards), "shards": shards}}
    write_manifest(
        directory, vocab_size=32000, special_tokens={"eos": 0}, tokenizer_sha256="0" * 64, splits=splits
    )
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        files = make_dataset(directory, args.gb)
        gb = sum(f.stat().st_size for f in files) / 2**30
        ours, peer, cached = [], [], []
        for _ in range(args.rounds):
            (directory / VERIFIED).unlink(missing_ok=True)
            t = time.perf_counter()
            ShardSet.open(directory)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            ShardSet.open(directory)
            cached.append(time.perf_counter() - t)
            t = time.perf_counter()
            subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
            peer.append(time.perf_counter() - t)
        o, p, c = (float(np.median(x)) / gb for x in (ours, peer, cached))
        print(f"{gb:.2f} GB in {len(files)} shards, median of {args.rounds} alternating rounds")
        print(f"first verification (sha256 + max id): {o:.2f} s/GB")
        print(f"sha256sum (peer):                     {p:.2f} s/GB")
        print(f"ratio llmforge / sha256sum:           {o / p:.2f}")
        print(f"later opens (cached):                 {c * 1000:.2f} ms/GB")


if __name__ == "__main__":
    main()
