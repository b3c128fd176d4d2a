"""python -m llmforge.export CKPT OUT_DIR [--tokenizer PATH | --no-tokenizer] [--dtype bfloat16]

Writes a Hugging Face model directory that ``transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)`` load: config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json. CKPT: a causal LM (objective=clm)
checkpoint, Lightning's or consolidated (``python -m llmforge.consolidate`` for a sharded FSDP one). The
tokenizer is the run's data tokenizer (``<data.path>/tokenizer.json``, checked against the data manifest's
sha256) unless ``--tokenizer`` names another.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def data_tokenizer(hp: dict, ckpt: Path) -> Path:
    """The tokenizer the run trained on: ``tokenizer.json`` beside its data manifest (``data.path`` as the
    run got it, else the absolute path in the run dir's ``run_manifest.json``)."""
    from llmforge.data.shards import MANIFEST, TOKENIZER_FILE, sha256_file

    data_path = (hp.get("data") or {}).get("path")
    if not data_path:
        raise ValueError(f"{ckpt}: the checkpoint does not record its data path: pass --tokenizer PATH")
    data = Path(data_path)
    run_manifest = ckpt.resolve().parent.parent / "run_manifest.json"  # <run_dir>/checkpoints/x.ckpt
    if not (data / TOKENIZER_FILE).is_file() and run_manifest.is_file():  # relative to another cwd
        data = Path(json.loads(run_manifest.read_text()).get("data", {}).get("path", data_path))
    tok = data / TOKENIZER_FILE
    if not tok.is_file():
        raise FileNotFoundError(
            f"{tok}: no tokenizer (data.path of the run is {data_path}; run from the directory the run "
            "was started in, or pass --tokenizer PATH / --no-tokenizer)"
        )
    manifest = data / MANIFEST
    if manifest.is_file():
        want = json.loads(manifest.read_text()).get("tokenizer_sha256")
        if want and sha256_file(tok) != want:
            raise ValueError(f"{tok} does not match the sha256 in {manifest}: the data dir has changed")
    return tok


def export(
    ckpt: str | Path, out_dir: str | Path, tokenizer: str | Path | None | bool = True, dtype: str = "float32"
) -> Path:
    """``tokenizer``: True = the run's data tokenizer, a path, or None/False = no tokenizer files."""
    from llmforge.hf import checkpoint_objective, export_state_dict, load_checkpoint

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    cfg, sd, hp = load_checkpoint(ckpt)
    objective = checkpoint_objective(hp)
    if objective != "clm":
        raise ValueError(
            f"{ckpt} is an objective={objective} checkpoint: only the causal LM (objective=clm) exports as "
            "LlamaForCausalLM"
        )
    tok = data_tokenizer(hp, Path(ckpt)) if tokenizer is True else (tokenizer or None)
    return export_state_dict(cfg, sd, tok, out_dir, dtype=DTYPES[dtype])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmforge.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("ckpt", help="llmforge checkpoint (.ckpt) of a causal LM")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="tokenizer.json (default: the run's data tokenizer)")
    group.add_argument("--no-tokenizer", action="store_true", help="write the model files only")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    tokenizer: str | bool = False if args.no_tokenizer else (args.tokenizer or True)
    try:
        out = export(args.ckpt, args.out_dir, tokenizer, args.dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
