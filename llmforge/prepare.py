"""python -m llmforge.prepare [key=value ...]   (see conf/prepare.yaml)

Text documents -> byte-level BPE tokenizer -> train/val token shards with a manifest. The output directory
appears atomically; its manifest holds a hash of the config, so a rerun with the same config is skipped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from itertools import islice
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmforge.config import register

register()


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(
        json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode()
    ).hexdigest()


def prepare(cfg: DictConfig) -> Path:
    from llmforge.data.shards import MANIFEST
    from llmforge.prep.text import documents
    from llmforge.prep.tokenizer import train_bpe
    from llmforge.prep.writers import replace_dir, write_token_dataset

    out = Path(cfg.output_dir)
    digest = config_hash(cfg)
    if (out / MANIFEST).is_file() and not cfg.force:
        if json.loads((out / MANIFEST).read_text()).get("config_hash") == digest:
            print(f"{out} is up to date (config hash {digest[:12]}); force=true rebuilds it")
            return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    docs = list(documents(cfg.input))
    if not docs:
        raise ValueError(f"input={cfg.input!r} gave no documents")
    t = cfg.tokenizer
    tokenizer = train_bpe(
        (text for _, text in islice(docs, t.sample_documents)), t.vocab_size, t.num_sentinels, t.min_frequency
    )
    t1 = time.perf_counter()
    manifest = write_token_dataset(
        docs,
        tokenizer,
        tmp,
        val_fraction=cfg.val_fraction,
        shard_tokens=cfg.shard_tokens,
        source={"input": cfg.input, "documents": len(docs), "characters": sum(len(x) for _, x in docs)},
        config_hash=digest,
    )
    replace_dir(tmp, out)
    t2 = time.perf_counter()
    for split, info in manifest["splits"].items():
        print(f"{split:5s} {info['documents']:7d} documents {info['tokens']:10d} tokens")
    print(f"tokenizer: vocab {manifest['vocab_size']} in {t1 - t0:.1f}s; shards written in {t2 - t1:.1f}s")
    print(f"dataset    {out}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
