"""CPU cost of the per-step monitoring work: the gradient norm (`llmforge.callbacks.total_grad_norm`) and the
stability guard's hooks (`StabilityGuard`), against one training step (forward, backward, AdamW) of the same
model on the same batch.

Measured as thread CPU time with one torch thread, so other processes on a shared machine barely change the
figures (wall-clock on a loaded 2-core box swung 10x). The gradient norm is computed on the logged steps only
(every `trainer.log_every_n_steps`); the figure below is its worst case, every step. Lightning's own logging
of the values is not included (see experiments/bench_overhead.py for the whole trainer vs a plain loop).

    python experiments/bench_monitoring.py [--model mini --batch-size 8 --seq-len 256 --steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def cpu_ms(fn) -> float:
    start = time.thread_time_ns()
    fn()
    return (time.thread_time_ns() - start) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "demo"))
    p.add_argument("--model", default="mini")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from llmforge.callbacks import StabilityGuard, total_grad_norm
    from llmforge.config import register
    from llmforge.data.datamodule import ShardDataModule
    from llmforge.data.shards import read_manifest
    from llmforge.training import build_module

    torch.set_num_threads(1)
    register()
    overrides = [
        f"model={args.model}",
        f"data.path={args.data}",
        "run_dir=unused",
        f"data.seq_len={args.seq_len}",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    module = build_module(cfg, read_manifest(cfg.data.path))
    data = ShardDataModule(
        path=cfg.data.path,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        collate_fn=module.collate_fn(),
        seed=1,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    params = sum(p.numel() for p in module.parameters())

    guard = StabilityGuard()
    trainer = SimpleNamespace(
        global_step=0,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
        world_size=1,
        is_global_zero=True,
    )
    fake_module = SimpleNamespace(
        last_train_loss=None, log=lambda *a, **k: None, parameters=module.parameters
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module.loss(batch)[0]
        fake_module.last_train_loss = loss.detach()
        loss.backward()
        optimizer.step()

    def guard_hooks() -> None:
        guard.on_train_batch_start(trainer, fake_module, batch, 0)
        guard.on_before_backward(trainer, fake_module, fake_module.last_train_loss)
        guard.on_before_optimizer_step(trainer, fake_module, optimizer)
        trainer.global_step += 1

    step()  # warm-up
    steps, norms, guards = [], [], []
    for _ in range(args.steps):
        steps.append(cpu_ms(step))
        norms.append(cpu_ms(lambda: total_grad_norm(module.parameters())))
        guards.append(cpu_ms(guard_hooks))
    s, n, g = (statistics.median(x) for x in (steps, norms, guards))
    print(
        f"model={args.model} ({params / 1e6:.1f}M params), batch {args.batch_size} x {args.seq_len}, 1 thread"
    )
    print(f"training step       {s:9.2f} ms CPU")
    print(f"gradient norm       {n:9.3f} ms CPU  ({n / s:.2%} of a step, when computed)")
    print(f"stability guard     {g:9.3f} ms CPU  ({g / s:.2%} of a step, every step)")


if __name__ == "__main__":
    main()
