"""python -m llmforge.inspect RUN_DIR --step N [--sample I] [--json]: the documents a training step saw.

For every rank, each window (sample) of optimizer step N: its source, window number and flat index, and
each document it overlaps: ordinal, id (WARC record id, file path or JSON id), URL or file and line, the
token range inside the window, and a short excerpt. Built from the run's ``config.yaml``, its
``data_log.jsonl`` and the lineage files the data stage wrote beside the shards (`llmforge.data.lineage`).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, required=True, help="optimizer step (0-based, as TensorBoard's axis)")
    p.add_argument("--sample", type=int, default=None, help="only the I-th window of the step on each rank")
    p.add_argument("--chars", type=int, default=120, help="excerpt length (0: none)")
    p.add_argument("--json", action="store_true", help="one JSON object per window")
    args = p.parse_args(argv)
    from llmforge.data.lineage import inspect_step

    try:
        windows = inspect_step(args.run_dir, args.step, args.sample, args.chars)
    except (ValueError, FileNotFoundError, KeyError, IndexError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for w in windows:
        if args.json:
            print(json.dumps(w, ensure_ascii=False))
            continue
        print(
            f"step {w['step']} rank {w['rank']} sample {w['sample']}: source {w['source']} "
            f"window {w['window']} (index {w['index']})"
        )
        for d in w["documents"]:
            where = d.get("url") or ":".join(str(d[k]) for k in ("file", "line") if k in d)
            span = f"{d['tokens'][0]}-{d['tokens'][1]}"
            print(f"    doc {d['ordinal']} tokens {span}  id {d.get('id')}  {where}")
            if d.get("excerpt"):
                print(f"        {d['excerpt']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
