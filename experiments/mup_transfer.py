"""µP width transfer: loss vs learning rate at several widths, with and without µP (``model.mup``).

The check µP exists for (Tensor Programs V): tune the learning rate on a narrow model, reuse it on a wide
one. Under the standard parameterisation (SP) the best Adam LR falls as the width grows; under µP it stays
put. Tiny decoders (2 layers, 4 heads, widths ``--widths``, µP base width = the narrowest) are trained for
``--steps`` AdamW steps (warmup then cosine, weight decay 0.1, the library's `param_groups` and
`lr_factor`, so µP's per-group LRs are the trainer's) on the demo corpus read as bytes (vocabulary 256:
the text of ``data/demo``'s token shards, decoded), all runs on the same batches; the figure is the
validation loss on fixed held-out windows. At the base width µP is SP exactly, so it is trained once.

    python experiments/mup_transfer.py [--data data/demo --widths 32,64,128 --steps 150 --out runs/mup]

Writes ``OUT/results.json``, ``OUT/mup_transfer.png`` and prints the table (best LR per width).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmforge.data.shards import TOKENIZER_FILE, ShardSet
from llmforge.models.transformer import Transformer, TransformerConfig
from llmforge.objectives.base import lr_factor, param_groups


def byte_stream(data: Path, split: str, limit: int) -> np.ndarray:
    """The split's text (decoded from the token shards) as bytes, at most ``limit`` tokens of it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data / TOKENIZER_FILE))
    ids = np.concatenate([np.asarray(a) for a in ShardSet.open(data, split).arrays])[:limit]
    text = tok.decode(ids.tolist(), skip_special_tokens=True)
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def batches(stream: np.ndarray, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(stream) - seq - 1, size=(n, batch))
    return [torch.from_numpy(np.stack([stream[s : s + seq + 1] for s in row])) for row in starts]


def train(width: int, mup: bool, lr: float, args, train_batches, val_batches) -> float:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=256,
        d_model=width,
        n_layers=args.layers,
        n_heads=4,
        max_seq_len=args.seq,
        mup=mup,
        mup_base_width=args.base,
    )
    model = Transformer(cfg)
    groups = param_groups(model, 0.1, lr, cfg.width_mult)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=args.warmup, total=args.steps, schedule="cosine", min_ratio=0.1)
    )
    for x in train_batches:
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        if not torch.isfinite(loss):
            return float("nan")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item() for x in val_batches
        ]
    return float(np.mean(losses))


def best(results: dict[str, float]) -> tuple[float, float]:
    finite = {float(k): v for k, v in results.items() if math.isfinite(v)}
    lr = min(finite, key=finite.get)
    return lr, finite[lr]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/demo")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--lrs", default=",".join(f"{2.0**-k:.6g}" for k in range(10, 5, -1)))  # 2^-10 .. 2^-6
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/mup")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    args.base = widths[0]
    data = Path(args.data)
    train_batches = batches(byte_stream(data, "train", 400_000), args.steps, args.batch, args.seq, seed=0)
    val_batches = batches(byte_stream(data, "val", 400_000), 16, args.batch, args.seq, seed=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, float]]] = {"sp": {}, "mup": {}}
    t0 = time.time()
    for width in widths:
        for kind in ("sp", "mup"):
            row = results[kind].setdefault(str(width), {})
            for lr in lrs:
                if kind == "mup" and width == args.base:
                    row[str(lr)] = results["sp"][str(width)][str(lr)]  # identical models at the base width
                    continue
                row[str(lr)] = train(width, kind == "mup", lr, args, train_batches, val_batches)
                print(
                    f"{kind:3s} width {width:4d} lr {lr:.2e}: val loss {row[str(lr)]:.4f}  "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    meta = {k: v for k, v in vars(args).items()}
    (out / "results.json").write_text(json.dumps({"args": meta, "results": results}, indent=1))
    print("\n| width | SP best LR | SP loss | µP best LR | µP loss |\n|---|---|---|---|---|")
    for width in widths:
        (sl, sv), (ml, mv) = best(results["sp"][str(width)]), best(results["mup"][str(width)])
        print(f"| {width} | {sl:.2e} | {sv:.4f} | {ml:.2e} | {mv:.4f} |")
    plot(results, widths, lrs, out / "mup_transfer.png")


def plot(results, widths, lrs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind, title in zip(axes, ("sp", "mup"), ("standard parameterisation", "µP"), strict=True):
        for width in widths:
            ys = [results[kind][str(width)][str(lr)] for lr in lrs]
            ax.plot(lrs, ys, marker="o", label=f"width {width}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak learning rate")
        ax.set_title(title)
        ax.legend()
    axes[0].set_ylabel("validation loss (bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
