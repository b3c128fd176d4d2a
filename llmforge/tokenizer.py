"""python -m llmforge.tokenizer OUT DIR=WEIGHT [DIR=WEIGHT ...] [--vocab-size N]: one tokenizer for a mixture.

Trains llmforge's byte-level BPE (same special tokens as the data stage's) on a sample of several prepared
datasets' train documents, each dataset giving its weight's share of ``--sample-chars`` characters
(`llmforge.prep.tokenizer.mixture_sample`), and writes ``OUT/tokenizer.json``. Then tokenize every source with
it: ``python -m llmforge.prepare ... output_dir=DIR tokenizer.path=OUT`` (the process and dedup stages are
reused; only the tokenizer and tokenize stages run again), and train with ``data=mixture``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_sources(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        path, sep, weight = item.rpartition("=")
        if not sep:
            path, weight = item, "1"
        try:
            out[path] = float(weight)
        except ValueError:
            raise ValueError(f"{item!r}: expected DIR=WEIGHT (a number)") from None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="directory for tokenizer.json")
    p.add_argument("sources", nargs="+", help="prepared dataset directories, each DIR=WEIGHT (default 1)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--num-sentinels", type=int, default=256)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--sample-chars", type=float, default=2e8, help="characters over all sources")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from llmforge.data.shards import TOKENIZER_FILE, sha256_file
    from llmforge.prep.tokenizer import mixture_sample, train_bpe

    try:
        sources = parse_sources(args.sources)
        texts = mixture_sample(sources, int(args.sample_chars), args.seed)
        tok = train_bpe(texts, args.vocab_size, args.num_sentinels, args.min_frequency)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_FILE))
    print(f"{out / TOKENIZER_FILE}  sha256 {sha256_file(out / TOKENIZER_FILE)}")
    print(f"next: python -m llmforge.prepare ... tokenizer.path={out} for every source")


if __name__ == "__main__":
    main()
