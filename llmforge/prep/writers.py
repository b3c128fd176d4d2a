"""Tokenize documents and write them as a token-shard dataset (format: `llmforge.data.shards`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from tokenizers import Tokenizer

from llmforge.data.shards import TOKENIZER_FILE, SplitWriter, sha256_file, write_manifest
from llmforge.prep.tokenizer import special_token_ids


def split_score(doc_id: str, text: str) -> float:
    """A document's place in [0, 1) for the train/val split: a hash of its id and text."""
    digest = hashlib.sha256(f"{doc_id}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(doc_id: str, text: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands in the same split."""
    return split_score(doc_id, text) < fraction


def batched(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def encode_into(
    writers: dict[str, SplitWriter],
    documents: Iterable[tuple[str, str] | tuple[str, str, dict]],
    tokenizer: Tokenizer,
    val_fraction: float,
    batch_size: int = 256,
) -> int:
    """Encode (id, text[, origin]) documents in batches into the train or val writer, chosen by hash;
    returns the count. Each document's origin (default ``{"id": id}``) goes to the lineage index."""
    # Text that happens to spell "<eos>" or "<mask>" is text: never let it become a special id.
    was, tokenizer.encode_special_tokens = tokenizer.encode_special_tokens, True
    # tokenizers >= 0.21: the same ids without computing character offsets (~10% less work)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    count = 0
    try:
        for chunk in batched(documents, batch_size):
            encodings = encode([doc[1] for doc in chunk], add_special_tokens=False)
            for doc, enc in zip(chunk, encodings, strict=True):
                doc_id, text = doc[0], doc[1]
                split = "val" if is_validation(doc_id, text, val_fraction) else "train"
                writers[split].add(enc.ids, doc[2] if len(doc) > 2 else {"id": doc_id})
                count += 1
    finally:
        tokenizer.encode_special_tokens = was
    return count


def write_token_dataset(
    documents: Iterable[tuple[str, str] | tuple[str, str, dict]],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    val_fraction: float = 0.01,
    shard_tokens: int = 1 << 26,
    batch_size: int = 256,
    source: dict | None = None,
    config_hash: str | None = None,
) -> dict:
    """Encode (id, text[, origin]) documents in batches, route them to train/val by hash, write shards, their
    lineage files and the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path = out_dir / TOKENIZER_FILE
    tokenizer.save(str(tok_path))
    specials = special_token_ids(tokenizer)
    vocab = tokenizer.get_vocab_size()
    writers = {
        split: SplitWriter(out_dir, split, vocab, specials["eos"], shard_tokens) for split in ("train", "val")
    }
    encode_into(writers, documents, tokenizer, val_fraction, batch_size)
    return write_manifest(
        out_dir,
        vocab_size=vocab,
        special_tokens=specials,
        tokenizer_sha256=sha256_file(tok_path),
        splits={split: w.summary() for split, w in writers.items()},
        source=source,
        config_hash=config_hash,
    )
