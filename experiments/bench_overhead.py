"""Lightning + Hydra overhead: `python -m llmforge.train` vs a plain torch loop on the same model, data and
optimizer.

Both sides run as separate processes (the trainer is measured through its real entry point), alternating
rounds because absolute speed drifts ~14% between processes. Each side reports the median wall time between
consecutive optimizer-step ends after a warm-up; the plain loop does the same work per step: DataLoader over
the same packed windows and sampler, CLM collate, forward, loss, backward, gradient clipping, AdamW step,
LR schedule step. Prints the overhead ratio; target <= 5%.

    python experiments/bench_overhead.py [--rounds 3 --steps 60 --model mini --precision 32-true]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plain_loop(args: argparse.Namespace) -> float:
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from llmforge.config import register
    from llmforge.data.dataset import GlobalCursorSampler, PackedWindows
    from llmforge.data.shards import ShardSet, read_manifest
    from llmforge.objectives.clm import CausalLM
    from llmforge.training import keep_freed_memory

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", f"data.path={args.data}", "run_dir=unused"])
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    manifest = read_manifest(args.data)
    model_cfg = OmegaConf.to_container(cfg.model)
    model_cfg["vocab_size"] = 64 * -(-manifest["vocab_size"] // 64)
    module = CausalLM(model_cfg, OmegaConf.to_container(cfg.optim), manifest["special_tokens"])
    module.trainer_max_steps = args.steps
    optimizer_cfg = module.configure_optimizers.__func__  # reuse the exact optimizer and schedule
    module.optim_cfg.decay_steps = args.steps
    opt = optimizer_cfg(module)
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    windows = PackedWindows(ShardSet.open(args.data, "train"), cfg.data.seq_len)
    loader = DataLoader(
        windows,
        batch_size=cfg.data.batch_size,
        collate_fn=module.collate_fn(),
        sampler=GlobalCursorSampler(len(windows), cfg.data.batch_size, seed=cfg.data.seed),
    )
    autocast = args.precision == "bf16-mixed"
    if args.precision == "bf16-true":
        module.to(torch.bfloat16)
    times, last = [], None
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _, _ = module.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # Lightning reads the loss every step for the progress bar and logs
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return statistics.median(times[args.warmup :])


def lightning_run(args: argparse.Namespace, run_dir: Path) -> float:
    cmd = [
        sys.executable,
        "-m",
        "llmforge.train",
        f"model={args.model}",
        f"data.path={args.data}",
        f"precision={args.precision}",
        f"trainer.max_steps={args.steps}",
        f"optim.decay_steps={args.steps}",
        "trainer.val_check_interval=100000",
        "trainer.limit_val_batches=0",
        "trainer.ckpt_every_n_steps=100000",
        f"trainer.log_every_n_steps={args.log_every}",
        f"trainer.enable_progress_bar={args.progress_bar}",
        f"+callbacks.throughput.warmup={args.warmup}",
        f"run_dir={run_dir}",
        f"hydra.run.dir={run_dir}/hydra",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"llmforge.train failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "perf.json").read_text())["median_step_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "demo"))
    p.add_argument("--model", default="mini")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "bf16-true"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--progress-bar", default="true", choices=["true", "false"])
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        print(json.dumps({"median_step_s": plain_loop(args)}))
        return
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "llmforge.prepare", f"output_dir={args.data}"], check=True, cwd=ROOT
        )
    lightning, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            lightning.append(lightning_run(args, Path(tmp) / f"round{r}"))
            out = subprocess.run(
                [sys.executable, __file__, "--plain", *sys.argv[1:]],
                check=True,
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout
            plain.append(json.loads(out.strip().splitlines()[-1])["median_step_s"])
            print(
                f"round {r}: llmforge.train {lightning[-1] * 1e3:7.1f} ms/step   "
                f"plain loop {plain[-1] * 1e3:7.1f} ms/step"
            )
    lt, pt = statistics.median(lightning), statistics.median(plain)
    print(
        f"\nmodel={args.model} precision={args.precision} steps={args.steps} (median of {args.rounds} rounds)"
    )
    print(f"{'side':<18}{'ms/step':>10}")
    print(f"{'llmforge.train':<18}{lt * 1e3:>10.1f}")
    print(f"{'plain torch loop':<18}{pt * 1e3:>10.1f}")
    print(f"overhead: {100 * (lt / pt - 1):+.1f}%  (ratio {lt / pt:.3f}; target <= +5%)")


if __name__ == "__main__":
    main()
