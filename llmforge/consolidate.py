"""python -m llmforge.consolidate CKPT_DIR [OUT] [--weights-only]

Turns a sharded checkpoint (what ``strategy=fsdp`` saves: a directory such as ``checkpoints/last.ckpt/``
holding one ``__<rank>_0.distcp`` file per rank, torch.distributed.checkpoint's ``.metadata`` and
Lightning's ``meta.pt``) into one ordinary Lightning ``.ckpt`` file, as a run without sharding writes it:

- ``state_dict``: full tensors keyed like a non-sharded checkpoint (``model.blocks.0.attn.qkv.weight``);
- ``optimizer_states``: ``[optimizer.state_dict()]``, parameters numbered in the model's order
  (not ``--weights-only``);
- everything Lightning kept beside them in ``meta.pt``: ``hyper_parameters``, ``global_step``, ``epoch``,
  ``loops``, ``lr_schedulers``, ``callbacks``, the data position (``ShardDataModule``), versions.

So every loader of a normal checkpoint reads it (``torch.load(...)["state_dict"]``,
``CausalLM.load_from_checkpoint``), and ``python -m llmforge.train resume=OUT`` continues from it under any
strategy and number of processes. It runs in one process without a process group (no GPU needed); memory:
the whole model and optimizer state once. The reading is `llmforge.checkpoints.load_sharded`: public
torch.distributed.checkpoint APIs, and no pickle in the directory may name anything but plain data (a
refused file gets one line).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from llmforge.checkpoints import consolidate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmforge.consolidate",
        description="Sharded (strategy=fsdp) checkpoint directory -> one ordinary Lightning .ckpt file.",
    )
    parser.add_argument("ckpt_dir", help="sharded checkpoint directory, e.g. runs/x/checkpoints/last.ckpt")
    parser.add_argument("out", nargs="?", help="output file (default: <dir>/../<name>.consolidated.ckpt)")
    parser.add_argument(
        "--weights-only", action="store_true", help="leave out the optimizer state (smaller; not resumable)"
    )
    args = parser.parse_args(argv)
    try:
        with Console(stderr=True).status("consolidating") as spinner:
            target = consolidate(
                args.ckpt_dir, args.out, weights_only=args.weights_only, status=spinner.update
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{target}  ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
