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
import sys

from llmforge.checkpoints import HF_DTYPES, export_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmforge.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("ckpt", help="llmforge checkpoint (.ckpt) of a causal LM")
    parser.add_argument("out_dir", help="Hugging Face model directory to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="tokenizer.json (default: the run's data tokenizer)")
    group.add_argument("--no-tokenizer", action="store_true", help="write the model files only")
    parser.add_argument("--dtype", default="float32", choices=sorted(HF_DTYPES))
    args = parser.parse_args(argv)
    tokenizer: str | bool = False if args.no_tokenizer else (args.tokenizer or True)
    try:
        out = export_hf(args.ckpt, args.out_dir, tokenizer, args.dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
