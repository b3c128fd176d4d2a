"""python -m llmforge.evaluate CKPT data=DIR: loss, perplexity and bits per byte of a checkpoint on shards.

The numbers are the trainer's (see `llmforge.evaluation`): the objective module is rebuilt from the
checkpoint (`llmforge.checkpoints.load_module`) and scores the split with its own collate function and loss,
in batches of the run's ``data.batch_size`` (from the run's ``config.yaml``; ``data.batch_size=``
overrides). ``trainer.limit_val_batches=N`` (or ``--limit-batches N``) scores the first N batches. A JSON
file holds the result (``--out``; default ``<run dir>/eval/<checkpoint>-<split>.json``). A checkpoint that
holds anything but tensors and plain data is refused with one line (it could run code).

A mixture run (``data=mixture``) is scored on every source's split on its own (loss, ppl, bpb per source),
and ``loss`` is the sources' losses weighted by their training weights, as the trainer's ``val/loss``.

``tasks=hellaswag,llmforge_stdlib`` scores lm-eval tasks instead (`llmforge.downstream`, needs the ``[eval]``
extra; ``limit=N`` items per task, ``num_fewshot=K``, ``include_path=DIR`` for task YAMLs of your own):
lm-eval's table, and its JSON in ``<run dir>/eval/<checkpoint>-lm_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmforge.evaluation import PRECISIONS, evaluate_run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m llmforge.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a .ckpt file (Lightning or consolidated) or a run directory")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value: data (or data.path), data.batch_size, data.seq_len, split, "
        "trainer.limit_val_batches, precision",
    )
    p.add_argument("--data", help="token shard directory (default: the run's data.path)")
    p.add_argument("--split", default=None, help="default: val")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size, else 8")
    p.add_argument("--limit-batches", type=int, default=None, help="score only the first N batches")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help="default: the run's, else 32-true")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto")
    p.add_argument("--out", help="JSON result file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    keys = {
        "data": "data",
        "data.path": "data",
        "data.batch_size": "batch_size",
        "data.seq_len": "seq_len",
        "split": "split",
        "trainer.limit_val_batches": "limit_batches",
        "limit_val_batches": "limit_batches",
        "precision": "precision",
        "tasks": "tasks",
        "limit": "limit",
        "num_fewshot": "num_fewshot",
        "include_path": "include_path",
    }
    args.seq_len = args.tasks = args.limit = args.num_fewshot = args.include_path = None
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            p.error(f"{item!r}: expected key=value with key one of {', '.join(keys)}")
        name = keys[key]
        ints = ("batch_size", "seq_len", "limit_batches", "limit", "num_fewshot")
        setattr(args, name, int(value) if name in ints else value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tasks:
        from llmforge.downstream.harness import evaluate_checkpoint

        options = dict(limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path)
        return evaluate_checkpoint(
            args.checkpoint, args.tasks.split(","), **options, device=args.device,
            batch_size=args.batch_size or 32, out=args.out,
        )  # fmt: skip
    try:
        file, result = evaluate_run(
            args.checkpoint, args.data, seq_len=args.seq_len, split=args.split, batch_size=args.batch_size,
            limit_batches=args.limit_batches, device=args.device, precision=args.precision,
            progress=not args.no_progress,
        )  # fmt: skip
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["checkpoint"] = str(file)
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    out = Path(args.out) if args.out else run_dir / "eval" / f"{file.stem}-{result['split']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name, r in (result.get("sources") or {}).items():
        bpb = f"{r['bpb']:.4f}" if r["bpb"] is not None else "n/a"
        print(f"{name}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  bpb {bpb}  ({r['tokens_scored']} tokens)")
    bpb = f"{result['bpb']:.4f}" if result["bpb"] is not None else "n/a (per source)"
    print(
        f"{result['split']}: loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  bpb {bpb}  "
        f"({result['tokens_scored']} tokens, {result['batches']} batches)  -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
