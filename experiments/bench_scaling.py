"""Scaling out on CPU: 1 process vs 2-process DDP vs 2-process FSDP2, through `python -m llmforge.train`.

Each configuration trains the same model on the same data for a few steps; one "device" is one CPU core
(``OMP_NUM_THREADS=1`` in every process, so 2 processes use 2 cores and 1 process uses 1). Figures:

- throughput: global training tokens/s (median step time after a warm-up, from the run's `perf.json`) and
  scaling efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process)), at the same per-process batch;
- memory: peak RSS per rank (the kernel's high-water mark ``VmHWM`` at the end of training) for FSDP vs
  DDP. The model is big enough (default ~168M parameters: vocab 8192, d 1024, 12 layers; batch 1 x 128)
  that parameters, gradients and AdamW state (16 bytes/parameter in fp32) dominate: DDP holds all of
  them on every rank (and a gradient bucket copy), FSDP half of them plus the blocks gathered in flight.
  Runs use ``hardware.tune_malloc=false`` unless ``--tune-malloc``: keeping freed memory in glibc's heap
  (the CPU speed-up of `llmforge.training.keep_freed_memory`) also keeps what FSDP's per-block gathers
  and reduce-scatters fragment, which adds ~1.3 GB per rank at this size and hides the sharding.

Configurations alternate over ``--rounds`` rounds (absolute speed drifts between processes); the median of
each is printed.

    python experiments/bench_scaling.py [--rounds 1 --steps 6 --d-model 1024 --layers 12 --batch 1 --seq 128]
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
from itertools import islice
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parent.parent


class PeakRSS(L.Callback):
    """Writes `peak_rss_rank{r}.json` (VmHWM of this process, in bytes) when training ends."""

    def on_train_end(self, trainer, pl_module):
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        out = Path(trainer.default_root_dir) / f"peak_rss_rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"vm_hwm_bytes": kib * 1024}))


def make_data(out: Path) -> Path:
    """~60 standard-library modules' docs -> 512-token BPE -> train/val shards (as the tests do)."""
    sys.path.insert(0, str(ROOT))
    from llmforge.prep.text import stdlib_documents
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import write_token_dataset

    docs = list(islice(stdlib_documents(), 60))
    tok = train_bpe((t for _, t in docs), vocab_size=512, num_sentinels=8)
    write_token_dataset(docs, tok, out, val_fraction=0.1)
    return out


CONFIGS = {
    "1 process": ("strategy=auto", "hardware.devices=1"),
    "2 x DDP": ("strategy=ddp", "hardware.devices=2"),
    "2 x FSDP": ("strategy=fsdp", "hardware.devices=2"),
}


def train(name: str, args: argparse.Namespace, data: Path, work: Path, round_: int) -> dict:
    run_dir = work / f"{name.replace(' ', '')}-{round_}"
    cmd = [
        sys.executable,
        "-m",
        "llmforge.train",
        *CONFIGS[name],
        f"data.path={data}",
        f"run_dir={run_dir}",
        "model=mini",
        f"model.vocab_size={args.vocab}",
        f"model.d_model={args.d_model}",
        f"model.n_layers={args.layers}",
        f"model.n_heads={args.d_model // 64}",
        f"data.seq_len={args.seq}",
        f"data.batch_size={args.batch}",
        f"precision={args.precision}",
        f"hardware.tune_malloc={str(args.tune_malloc).lower()}",
        f"trainer.max_steps={args.steps}",
        "trainer.val_check_interval=100000",
        "trainer.limit_val_batches=0",
        "trainer.ckpt_every_n_steps=100000",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "logger=none",
        f"+callbacks.throughput.warmup={args.warmup}",
        "+callbacks.rss._target_=experiments.bench_scaling.PeakRSS",
    ]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "PL_"))
    }
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), LLMFORGE_EXTRA_TARGETS="experiments.")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    perf = json.loads((run_dir / "perf.json").read_text())
    rss = [json.loads(p.read_text())["vm_hwm_bytes"] for p in sorted(run_dir.glob("peak_rss_rank*.json"))]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~1 GB: not needed
    return {"tokens_per_s": perf["tokens_per_s"], "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=1, help="per process")
    parser.add_argument("--tune-malloc", action="store_true", help="hardware.tune_malloc=true (see above)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--data", type=Path, default=None, help="token shards (default: built from stdlib docs)"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from llmforge.models.transformer import TransformerConfig, num_params

    n = num_params(
        TransformerConfig(
            vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data or make_data(work / "data")
        results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for r in range(args.rounds):
            for name in CONFIGS:
                res = train(name, args, data, work, r)
                results[name].append(res)
                mib = ", ".join(f"{b / 2**20:.0f}" for b in res["rss"])
                print(
                    f"round {r} {name:10s} {res['tokens_per_s']:8.1f} tokens/s  peak RSS per rank [{mib}] MiB"
                )

    print(
        f"\nmodel {n / 1e6:.1f}M parameters (vocab {args.vocab}, d {args.d_model}, {args.layers} layers), "
        f"{args.precision}, batch {args.batch} x seq {args.seq} per process, 1 thread per process, "
        f"{args.steps} steps (median after {args.warmup}), {args.rounds} rounds, "
        f"tune_malloc={args.tune_malloc}"
    )
    tps = {name: statistics.median(r["tokens_per_s"] for r in res) for name, res in results.items()}
    rss = {name: statistics.median(max(r["rss"]) for r in res) for name, res in results.items()}
    for name in CONFIGS:
        line = f"{name:10s} {tps[name]:8.1f} tokens/s   max peak RSS of a rank {rss[name] / 2**20:7.0f} MiB"
        if name != "1 process":
            line += f"   scaling efficiency {tps[name] / (2 * tps['1 process']):.2f}"
        print(line)
    print(f"FSDP / DDP peak RSS per rank: {rss['2 x FSDP'] / rss['2 x DDP']:.2f}")


if __name__ == "__main__":
    main()
