"""Mixtures: realised source shares vs weights, and what mixing costs in training speed.

(a) Shares: `MixtureSampler` over 1e5 windows for several weight settings and source sizes (a small source
    that repeats many epochs, a large one); the realised share of each source and the largest deviation
    from its weight, in percentage points.
(b) Speed: `python -m llmforge.train` on a 2-source mixture (``data=mixture``, 0.7/0.3) vs a single dataset
    of the same total size (the two sources' train documents written into one directory, same
    tokenizer), same model and batch, alternating rounds; median ``perf.json`` tokens/s of each, and their
    ratio (target >= 0.98). Also the data path alone: windows/s of each DataLoader (sampler, read, collate).

    python experiments/bench_mixture.py --web data/mix-web --code data/mix-code [--model mini --steps 30]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def shares() -> list[str]:
    from llmforge.data.mixture import MixtureSampler, normalise

    rows = []
    n = 100_000
    cases = (
        ([2_000, 5_000_000], [0.7, 0.3]),
        ([50, 10**9], [0.5, 0.5]),
        ([300, 20_000, 10**6], [0.2, 0.3, 0.5]),
        ([1000, 1000, 1000, 1000], [0.1, 0.2, 0.3, 0.4]),
        ([10**6, 10**6], [0.99, 0.01]),
    )
    for sizes, weights in cases:
        source, draw, _ = MixtureSampler(sizes, weights, 8, seed=1).locate(np.arange(n))
        real = np.bincount(source, minlength=len(sizes)) / n
        dev = float(np.abs(real - normalise(weights)).max() * 100)
        counts = np.bincount(source, minlength=len(sizes))
        epochs = [f"{d / s:.3g}" for d, s in zip(counts, sizes, strict=True)]
        rows.append(
            f"sizes {sizes} weights {weights}: realised {np.round(real, 5).tolist()} "
            f"max deviation {dev:.4f} points; epochs {epochs}"
        )
    return rows


def single_dataset(sources: list[Path], out: Path) -> Path:
    """The sources' train documents (interleaved) and val documents in one dataset directory."""
    from llmforge.data.shards import TOKENIZER_FILE, ShardSet, SplitWriter, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(sources[0] / TOKENIZER_FILE, out / TOKENIZER_FILE)
    manifest = json.loads((sources[0] / "manifest.json").read_text())
    splits = {}
    for split in ("train", "val"):
        writer = SplitWriter(out, split, manifest["vocab_size"], manifest["special_tokens"]["eos"])
        iters = [ShardSet.open(s, split).documents() for s in sources]
        while iters:
            for it in list(iters):
                doc = next(it, None)
                if doc is None:
                    iters.remove(it)
                else:
                    writer.add(doc[:-1])  # the writer appends EOS again
        splits[split] = writer.summary()
    write_manifest(
        out,
        vocab_size=manifest["vocab_size"],
        special_tokens=manifest["special_tokens"],
        tokenizer_sha256=manifest["tokenizer_sha256"],
        splits=splits,
    )
    return out


def train(data_args: list[str], run_dir: Path, args) -> float:
    cmd = [
        sys.executable,
        "-m",
        "llmforge.train",
        f"model={args.model}",
        *data_args,
        f"run_dir={run_dir}",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        f"trainer.max_steps={args.steps}",
        "trainer.val_check_interval=100000",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "trainer.ckpt_every_n_steps=100000",
        "callbacks.guard.save_initial=false",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    return json.loads((run_dir / "perf.json").read_text())["tokens_per_s"]


def loader_rate(dm, batches: int) -> float:
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * dm.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--web", default=str(ROOT / "data" / "mix-web"))
    p.add_argument("--code", default=str(ROOT / "data" / "mix-code"))
    p.add_argument("--model", default="mini")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loader-batches", type=int, default=500)
    args = p.parse_args()

    print("(a) realised shares over 1e5 windows")
    for row in shares():
        print("   ", row)

    from llmforge.data.datamodule import ShardDataModule
    from llmforge.objectives.clm import clm_collate

    tmp = Path(tempfile.mkdtemp(prefix="bench-mixture-"))
    single = single_dataset([Path(args.web), Path(args.code)], tmp / "single")
    mixture = [
        "data=mixture",
        f"data.sources.web.path={args.web}",
        "data.sources.web.weight=0.7",
        f"data.sources.code.path={args.code}",
        "data.sources.code.weight=0.3",
    ]
    plain = [f"data.path={single}"]

    from functools import partial

    collate = partial(clm_collate, pad_id=0)
    dm_single = ShardDataModule(str(single), args.seq_len, args.batch_size, collate)
    dm_mix = ShardDataModule(
        None,
        args.seq_len,
        args.batch_size,
        collate,
        sources={"web": {"path": args.web, "weight": 0.7}, "code": {"path": args.code, "weight": 0.3}},
    )
    tokens = (
        dm_single.manifest["splits"]["train"]["tokens"],
        sum(s.manifest["splits"]["train"]["tokens"] for s in dm_mix.sources),
    )
    print(f"(b) train tokens: single {tokens[0]:,}, mixture {tokens[1]:,}")
    rates = {"single": [], "mixture": []}
    for _ in range(args.rounds):
        rates["single"].append(loader_rate(dm_single, args.loader_batches))
        rates["mixture"].append(loader_rate(dm_mix, args.loader_batches))
    s, m = statistics.median(rates["single"]), statistics.median(rates["mixture"])
    print(
        f"    data path alone (sampler + read + collate), windows/s: single {s:,.0f}, mixture {m:,.0f}, "
        f"ratio {m / s:.3f}"
    )

    speeds = {"single": [], "mixture": []}
    for r in range(args.rounds):
        for name, data in (
            (("single", plain), ("mixture", mixture))
            if r % 2 == 0
            else (("mixture", mixture), ("single", plain))
        ):
            speeds[name].append(train(data, tmp / f"{name}-{r}", args))
        last = {k: v[-1] for k, v in speeds.items()}
        print(f"    round {r}: single {last['single']:.0f}, mixture {last['mixture']:.0f} tokens/s")
    s, m = statistics.median(speeds["single"]), statistics.median(speeds["mixture"])
    paired = statistics.median(b / a for a, b in zip(speeds["single"], speeds["mixture"], strict=True))
    shape = f"{args.model}, batch {args.batch_size} x {args.seq_len}, {args.steps} steps"
    print(
        f"    training tokens/s ({shape}, median of {args.rounds}): single {s:.0f}, mixture {m:.0f}, "
        f"ratio {m / s:.3f} (paired {paired:.3f})"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
