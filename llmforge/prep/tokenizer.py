"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with llmforge's reserved special tokens.

The special tokens come first, so their ids are stable across vocabulary sizes: PAD=0, UNK=1, BOS=2,
EOS=3, MASK=4, then the span-corruption sentinels ``<extra_id_0>`` ... (T5's names), then the bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<bos>", "<eos>", "<mask>"
CORE_SPECIALS = {"pad": PAD, "unk": UNK, "bos": BOS, "eos": EOS, "mask": MASK}


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens(num_sentinels: int) -> list[str]:
    return [*CORE_SPECIALS.values(), *(sentinel(i) for i in range(num_sentinels))]


def train_bpe(
    texts: Iterable[str], vocab_size: int, num_sentinels: int = 100, min_frequency: int = 2
) -> Tokenizer:
    specials = special_tokens(num_sentinels)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"tokenizer.vocab_size={vocab_size} is too small: the {len(specials)} special tokens and "
            f"{len(alphabet)} bytes alone need {len(specials) + len(alphabet)}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Name -> id for the core specials and every sentinel the tokenizer has."""
    ids = {name: tok.token_to_id(token) for name, token in CORE_SPECIALS.items()}
    i = 0
    while (sid := tok.token_to_id(sentinel(i))) is not None:
        ids[f"sentinel_{i}"] = sid
        i += 1
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


def load(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def mixture_sample(datasets: dict[str, float], sample_chars: int, seed: int = 0) -> Iterator[str]:
    """Texts of the train documents of several prepared datasets, each dataset contributing its share of
    ``sample_chars`` characters (its weight over the sum): documents in a seeded random order (a Feistel
    permutation of each dataset's document ordinals), decoded from the token shards with the dataset's own
    tokenizer (byte-level BPE decodes to the very text it encoded). The shards hold exactly the documents
    the data stage kept (cleaned, filtered, deduplicated), whatever pipeline wrote them."""
    from llmforge.data.permutation import derive_key, permute
    from llmforge.data.shards import TOKENIZER_FILE, ShardSet

    total = sum(datasets.values())
    if not datasets or total <= 0 or min(datasets.values()) <= 0:
        raise ValueError(f"dataset weights {datasets} must be positive")
    for k, (directory, weight) in enumerate(sorted(datasets.items())):
        shards = ShardSet.open(directory, "train")
        tok = load(Path(directory) / TOKENIZER_FILE)
        budget = sample_chars * weight / total
        starts = [np.concatenate([[0], e[:-1]]) for e in shards.doc_ends]
        first = np.cumsum([0] + [e.size for e in shards.doc_ends])
        n = int(first[-1])
        used = 0
        for p in range(n):
            if used >= budget:
                break
            doc = int(permute(p, n, derive_key(seed, k)))
            shard = int(np.searchsorted(first, doc, side="right")) - 1
            i = doc - int(first[shard])
            ids = np.asarray(shards.arrays[shard][starts[shard][i] : shards.doc_ends[shard][i] - 1])
            text = tok.decode(ids.tolist(), skip_special_tokens=False)
            used += len(text)
            yield text
