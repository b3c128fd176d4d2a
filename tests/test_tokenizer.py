"""Byte-level BPE trained in-process: special ids, exact round trips; and the token-dataset writer."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from llmforge.data.shards import ShardSet, read_manifest, sha256_file
from llmforge.prep.tokenizer import load, special_token_ids, special_tokens, train_bpe
from llmforge.prep.writers import is_validation, write_token_dataset

CORPUS = [
    """The history of the printing press begins in the fifteenth century, when Johannes Gutenberg
    combined movable metal type, oil-based ink and a wooden press adapted from those used to make wine.
    Within a few decades, printing shops had spread to more than two hundred cities across Europe.""",
    """A language model assigns a probability to every sequence of tokens. Training such a model on a
    large corpus of text teaches it grammar, facts about the world, and a great deal of noise besides.
    The quality of the data matters at least as much as the size of the model.""",
    """Rivers shape the land they cross. Over thousands of years, the water carves valleys, deposits
    sediment on the plains and builds deltas where it meets the sea. People have always settled
    along rivers, for the water, the fertile soil and the easy transport they offer.""",
    """In the kitchen, bread is made from flour, water, salt and yeast. The dough is kneaded, left to
    rise, shaped, and baked in a hot oven until the crust is brown and the loaf sounds hollow.""",
    "Le chat dort près de la fenêtre. L'été dernier, nous sommes allés à la mer ; c'était très agréable.",
    "Die Straße war nass, und die Kinder spielten fröhlich im Garten. Größe, Übermut und Mädchen.",
    "東京は日本の首都です。今日はとても良い天気ですね。私は毎朝コーヒーを飲みます。",
    "Numbers: 0 1 2 3 42 1999 2024, symbols: $ % & * (x + y) = z; email: someone@example.org",
]
TEXTS = CORPUS * 20

ROUND_TRIP = [
    "",
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nand    runs of spaces",
    "Ça va ? Très bien, merci. Où est la bibliothèque ?",
    "Schöne Grüße aus München: Äpfel, Öl, Übung, ß.",
    "日本語のテキストとカタカナ、ひらがな。",
    "emoji 😀🎉 and a family 👨‍👩‍👧 (ZWJ) and flags 🇫🇷",
    "combining: e\u0301 vs \u00e9, Hangul 한국어, Arabic العربية, Hebrew עברית, Hindi हिन्दी",
    "control chars \x00\x01\x7f and the BOM \ufeff and NBSP\u00a0here",
    "\u200b\u200d zero-widths \U0010ffff last plane",
    "code: def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(TEXTS, vocab_size=400, num_sentinels=10)


def test_special_token_ids(tok):
    ids = special_token_ids(tok)
    sentinels = {f"sentinel_{i}": 5 + i for i in range(10)}
    expected = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, **sentinels}
    assert ids == expected
    for token, i in zip(special_tokens(10), range(15), strict=True):
        assert tok.token_to_id(token) == i
        assert tok.id_to_token(i) == token
    assert tok.token_to_id("<extra_id_10>") is None


def test_vocabulary_size_and_merges(tok):
    size = tok.get_vocab_size()
    assert 15 + 256 < size <= 400  # specials + bytes + some learned merges
    english = CORPUS[1]
    assert len(tok.encode(english).ids) < 0.6 * len(english.encode())  # merges actually compress


def test_special_ids_stable_across_vocab_sizes():
    small = train_bpe(TEXTS[:8], vocab_size=300, num_sentinels=3)
    assert special_token_ids(small) == {
        "pad": 0,
        "unk": 1,
        "bos": 2,
        "eos": 3,
        "mask": 4,
        "sentinel_0": 5,
        "sentinel_1": 6,
        "sentinel_2": 7,
    }


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert 1 not in ids  # byte-level: never UNK
    assert all(0 <= i < tok.get_vocab_size() for i in ids)


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    specials = set(special_tokens(10))
    for _ in range(200):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        text = "".join(chars)
        assert not any(s in text for s in specials)
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text, repr(text)
        assert 1 not in ids


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    again = load(path)
    text = ROUND_TRIP[9]
    assert again.encode(text).ids == tok.encode(text).ids
    assert special_token_ids(again) == special_token_ids(tok)


@pytest.mark.parametrize("vocab_size", [0, 100, 270])
def test_vocab_too_small(vocab_size):
    with pytest.raises(ValueError, match="too small"):
        train_bpe(TEXTS[:8], vocab_size=vocab_size, num_sentinels=10)


def test_vocab_exactly_specials_plus_bytes():
    tok = train_bpe(TEXTS[:8], vocab_size=271, num_sentinels=10)
    assert tok.get_vocab_size() == 271
    assert tok.decode(tok.encode(ROUND_TRIP[8]).ids) == ROUND_TRIP[8]


def test_special_token_ids_requires_core_specials():
    with pytest.raises(ValueError, match="lacks"):
        special_token_ids(Tokenizer(models.BPE()))


def test_literal_special_strings_in_documents_are_plain_text(tok, tmp_path):
    text = "An HTML page about T5 mentions <extra_id_0> and BERT's <mask>; GPT-2 ends with <eos> here."
    write_token_dataset([("d0", text)], tok, tmp_path, val_fraction=0.0)
    (doc,) = ShardSet.open(tmp_path).documents()
    specials = set(special_token_ids(tok).values())
    # only the appended end-of-document EOS may be special
    assert [int(t) for t in doc[:-1] if int(t) in specials] == []
    assert tok.decode(doc[:-1].tolist()) == text


# -- writers ---------------------------------------------------------------------------------------
def synthetic_docs(n: int) -> list[tuple[str, str]]:
    rng = random.Random(1)
    words = " ".join(CORPUS[:4]).split()
    return [(f"doc-{i}", " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))) for i in range(n)]


def test_is_validation_deterministic():
    docs = synthetic_docs(300)
    first = [is_validation(i, t, 0.3) for i, t in docs]
    assert first == [is_validation(i, t, 0.3) for i, t in docs]
    assert 0 < sum(first) < len(first)
    assert not any(is_validation(i, t, 0.0) for i, t in docs)
    assert all(is_validation(i, t, 1.0) for i, t in docs)
    # monotone in the fraction: a validation document stays one as the fraction grows
    assert all(is_validation(i, t, 0.5) for (i, t), v in zip(docs, first, strict=True) if v)
    # the id is part of the key: same text, different ids, different splits somewhere
    assert len({is_validation(f"x{k}", "same text", 0.5) for k in range(50)}) == 2


def test_write_token_dataset(tok, tmp_path):
    docs = synthetic_docs(2000)
    manifest = write_token_dataset(
        docs,
        tok,
        tmp_path / "a",
        val_fraction=0.1,
        shard_tokens=2048,
        batch_size=128,
        source={"name": "synthetic"},
        config_hash="abc",
    )
    assert read_manifest(tmp_path / "a") == manifest
    assert manifest["dtype"] == "uint16"
    assert manifest["vocab_size"] == tok.get_vocab_size()
    assert manifest["special_tokens"] == special_token_ids(tok)
    assert manifest["tokenizer_sha256"] == sha256_file(tmp_path / "a" / "tokenizer.json")
    assert manifest["source"] == {"name": "synthetic"} and manifest["config_hash"] == "abc"
    assert len(manifest["splits"]["train"]["shards"]) > 1

    expected = {"train": [], "val": []}
    for doc_id, text in docs:
        expected["val" if is_validation(doc_id, text, 0.1) else "train"].append(text)
    n_val = len(expected["val"])
    assert 0.07 * len(docs) < n_val < 0.13 * len(docs)
    eos = special_token_ids(tok)["eos"]
    for split in ("train", "val"):
        assert manifest["splits"][split]["documents"] == len(expected[split])
        back = list(ShardSet.open(tmp_path / "a", split, verify=True).documents())
        assert [tok.decode(d[:-1].tolist()) for d in back] == expected[split]
        assert all(int(d[-1]) == eos for d in back)

    # same input -> byte-identical output, whatever the batch size
    again = write_token_dataset(
        docs,
        tok,
        tmp_path / "b",
        val_fraction=0.1,
        shard_tokens=2048,
        batch_size=7,
        source={"name": "synthetic"},
        config_hash="abc",
    )
    assert again == manifest
    for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        assert np.array_equal(
            np.fromfile(tmp_path / "a" / shard["file"], dtype="<u2"),
            np.fromfile(tmp_path / "b" / shard["file"], dtype="<u2"),
        )
