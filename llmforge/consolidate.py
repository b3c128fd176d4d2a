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
the whole model and optimizer state once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def default_output(ckpt_dir: Path) -> Path:
    """``checkpoints/last.ckpt/`` -> ``checkpoints/last.consolidated.ckpt``."""
    stem = ckpt_dir.name.removesuffix(".ckpt")
    return ckpt_dir.with_name(f"{stem}.consolidated.ckpt")


def index_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's form) -> the form of
    ``optimizer.state_dict()``, with integer ids.

    A parameter's id is its position in the model (``names``: the model's state-dict keys, in order;
    those the optimizer does not hold are skipped), and each param group lists its parameters' ids in the
    group's own order. `torch.optim.Optimizer.load_state_dict` matches parameters by their place in the
    groups, so it loads this; Lightning's FSDP loader (``strategy=fsdp`` resuming from a single file)
    maps id i to the i-th parameter of the model, so it loads this too.
    """
    held = {name for group in state["param_groups"] for name in group["params"]}
    missing = held - set(names)
    if missing:
        raise ValueError(f"optimizer holds parameters the model state lacks: {sorted(missing)[:3]}")
    ids = {name: i for i, name in enumerate(n for n in names if n in held)}
    unknown = set(state["state"]) - held
    if unknown:
        raise ValueError(f"optimizer state for parameters in no param group: {sorted(unknown)[:3]}")
    groups = [{**group, "params": [ids[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {ids[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def load_sharded(ckpt_dir: str | os.PathLike, weights_only: bool = False) -> dict[str, Any]:
    """The whole checkpoint of a sharded directory as one dict of full tensors (see the module doc)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(ckpt_dir)
    if path.is_file():
        raise ValueError(f"{path} is a file: it is a single-file checkpoint already")
    if not is_sharded(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (no .metadata file in it)")
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path / META_FILE} is missing: not a checkpoint written by Lightning")
    checkpoint: dict[str, Any] = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    # what `torch.distributed.checkpoint.format_utils.dcp_to_torch_save` does, without its temporary file:
    # the planner rebuilds the saved structure from the metadata (`keys`: only the model's weights)
    sharded: dict[str, Any] = {}
    planner = _EmptyStateDictLoadPlanner(keys={"state_dict"} if weights_only else None)
    _load_state_dict(sharded, storage_reader=FileSystemReader(path), planner=planner, no_dist=True)
    checkpoint["state_dict"] = sharded.pop("state_dict")
    if not weights_only:
        optimizers = sorted((k for k in sharded if k.startswith("optimizer_")), key=lambda k: int(k[10:]))
        names = list(checkpoint["state_dict"])  # the model's order (torch.distributed.checkpoint keeps it)
        checkpoint["optimizer_states"] = [index_optimizer_state(sharded.pop(k), names) for k in optimizers]
    else:
        for key in ("optimizer_states", "lr_schedulers"):
            checkpoint.pop(key, None)
    return checkpoint


def consolidate(
    ckpt_dir: str | os.PathLike, out: str | os.PathLike | None = None, weights_only: bool = False
) -> Path:
    """Write ``ckpt_dir`` as one ``.ckpt`` file (atomically: a temporary file, then a rename)."""
    target = Path(out) if out is not None else default_output(Path(ckpt_dir))
    checkpoint = load_sharded(ckpt_dir, weights_only=weights_only)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(target)
    return target


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
        target = consolidate(args.ckpt_dir, args.out, weights_only=args.weights_only)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{target}  ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
