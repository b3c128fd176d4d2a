"""Deduplication: normalisation, datasketch-exact signatures, LSH parameters, the global stage, shards."""

from __future__ import annotations

import inspect
import pickle

import numpy as np
import pytest

from llmforge.prep.dedup import (
    MinHasher,
    _components,
    exact_hash,
    find_duplicates,
    load_signatures,
    lsh_params,
    lsh_recall,
    normalize_for_dedup,
    pack_keys,
    save_signatures,
    shingles,
    unpack_keys,
)

# ----------------------------------------------------------------------------------------------------------
# A deterministic corpus: pseudo-words from syllables, Zipf-distributed, documents of 300-1000 words.

SYLLABLES = "ka lo mi ne ru sa ti vo we xu ya ze bi do fu ga he ji".split()


def make_vocab(size: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = {"".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(size * 3)}
    return np.array(sorted(words)[:size])


VOCAB = make_vocab()
ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1)
ZIPF /= ZIPF.sum()


def make_doc(rng: np.random.Generator, lo: int = 300, hi: int = 1000) -> list[str]:
    return list(rng.choice(VOCAB, size=int(rng.integers(lo, hi)), p=ZIPF))


def edit(words: list[str], fraction: float, rng: np.random.Generator) -> list[str]:
    """Replace `fraction` of the word positions with random vocabulary words."""
    out = list(words)
    k = max(1, round(fraction * len(out)))
    for i in rng.choice(len(out), size=k, replace=False):
        out[i] = str(rng.choice(VOCAB))
    return out


def to_text(words: list[str]) -> str:
    """Sentences with capitals and punctuation, which normalisation removes again."""
    parts = []
    for i in range(0, len(words), 12):
        sentence = " ".join(words[i : i + 12])
        parts.append(sentence[:1].upper() + sentence[1:] + ".")
    return " ".join(parts)


def jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def corpus() -> dict:
    """60 distinct bases; 20 of them get a near copy (J > 0.85), 10 a far edit (J < 0.5), 5 an exact copy
    (different case, punctuation and spacing). Copies come after their bases."""
    rng = np.random.default_rng(1)
    bases = [make_doc(rng) for _ in range(60)]
    texts = [to_text(w) for w in bases]
    near, far, exact = [], [], []
    for i in range(20):
        texts.append(to_text(edit(bases[i], 0.006, rng)))
        near.append((i, len(texts) - 1))
    for i in range(20, 30):
        texts.append(to_text(edit(bases[i], 0.12, rng)))
        far.append((i, len(texts) - 1))
    for i in range(30, 35):
        texts.append("  " + texts[i].upper().replace(".", " !"))
        exact.append((i, len(texts) - 1))
    return {"texts": texts, "near": near, "far": far, "exact": exact}


@pytest.fixture(scope="module")
def hasher() -> MinHasher:
    return MinHasher(num_perm=128, ngram=5, seed=1)


@pytest.fixture(scope="module")
def sigs(corpus, hasher) -> np.ndarray:
    return hasher.signatures(corpus["texts"])


# ----------------------------------------------------------------------------------------------------------
# Normalisation, exact hash, shingles


def test_normalize():
    assert normalize_for_dedup("  Hello,\tWORLD!!  ok\n") == "hello world ok"
    assert normalize_for_dedup("ﬁne ＡＢＣ") == "fine abc"  # NFKC: ligature, full-width
    assert normalize_for_dedup("word,word—word") == "word word word"
    assert normalize_for_dedup("café") == normalize_for_dedup("cafe\u0301")  # composed = decomposed
    assert normalize_for_dedup("¿Qué?") == "qué"
    assert normalize_for_dedup("...") == ""
    assert normalize_for_dedup("Cost: $5 + 3 = 8 €") == "cost $5 + 3 = 8 €"  # symbols are not punctuation
    assert normalize_for_dedup("bad\udcff, byte") == "bad\udcff byte"  # lone surrogates pass through
    assert shingles("bad\udcff, byte", ngram=2) == ["bad\udcff byte".encode("utf-8", "surrogatepass")]
    assert exact_hash("bad\udcff, byte") == exact_hash("BAD\udcff byte")


def test_exact_hash_is_stable_and_normalised():
    h = exact_hash("Hello, world!")
    assert h == exact_hash("hello   WORLD") and 0 <= h < 2**64
    # BLAKE2b-64 of b"hello world", little-endian: fixed forever, whatever the process or Python version.
    assert h == 0x50B1A332AA338687
    assert exact_hash("hello world.") == h and exact_hash("hello worlds") != h


def test_shingles():
    assert shingles("A b, C d e f!", ngram=5) == [b"a b c d e", b"b c d e f"]
    assert shingles("Short doc.", ngram=5) == [b"short doc"]
    assert shingles("", ngram=3) == [b""]
    words = normalize_for_dedup("Élan vital — ÇA va? oui. " * 5).split()
    assert shingles(" ".join(words), ngram=3) == [
        " ".join(words[i : i + 3]).encode() for i in range(len(words) - 2)
    ]


# ----------------------------------------------------------------------------------------------------------
# Signatures equal datasketch's, bit for bit


def ds_minhash(num_perm: int, seed: int, scheme: str | None):
    """datasketch.MinHash; datasketch < 2.0 (allowed by the dev extra) knows only the legacy scheme."""
    datasketch = pytest.importorskip("datasketch")
    if "scheme" in inspect.signature(datasketch.MinHash).parameters:
        return datasketch.MinHash(num_perm=num_perm, seed=seed, **({"scheme": scheme} if scheme else {}))
    if scheme not in (None, "legacy"):
        pytest.skip(f"datasketch {getattr(datasketch, '__version__', '< 2.0')} has no scheme {scheme!r}")
    return datasketch.MinHash(num_perm=num_perm, seed=seed)


@pytest.mark.parametrize(
    "scheme,num_perm,ngram,seed",
    [("affine32", 128, 5, 1), ("affine32", 64, 3, 7), ("legacy", 128, 5, 1), ("affine64", 32, 5, 3)],
)
def test_signatures_equal_datasketch(corpus, scheme, num_perm, ngram, seed):
    texts = corpus["texts"][:25] + ["", "One.", "two words", "Ünïcödé ﬁ ＡＢＣ — «quoted» text, here!"]
    hasher = MinHasher(num_perm=num_perm, ngram=ngram, seed=seed, scheme=scheme, chunk=300)
    got = hasher.signatures(texts)  # chunk=300 splits documents across working buffers
    assert got.shape == (len(texts), num_perm)
    for text, row in zip(texts, got, strict=True):
        m = ds_minhash(num_perm, seed, scheme)
        for s in shingles(text, ngram):
            m.update(s)
        assert row.dtype == m.hashvalues.dtype
        np.testing.assert_array_equal(row, m.hashvalues)
        np.testing.assert_array_equal(hasher.signature(text), row)


def test_default_matches_datasketch_default(corpus):
    text = corpus["texts"][0]
    m = ds_minhash(128, 1, None)
    m.update_batch(shingles(text))
    scheme = getattr(m, "scheme", "legacy")  # datasketch >= 2.0: affine32 (our default); before: legacy
    np.testing.assert_array_equal(MinHasher(scheme=scheme).signature(text), m.hashvalues)
    if scheme == "affine32":
        np.testing.assert_array_equal(MinHasher().signature(text), m.hashvalues)


def test_hasher_pickles_and_is_deterministic(corpus, hasher, sigs):
    again = pickle.loads(pickle.dumps(hasher))
    np.testing.assert_array_equal(again.signatures(corpus["texts"]), sigs)
    assert hasher.signatures([]).shape == (0, 128)


# ----------------------------------------------------------------------------------------------------------
# LSH parameters


def test_lsh_params_recall_at_threshold():
    bands, rows = lsh_params(0.8, 128)
    assert bands * rows <= 128
    assert lsh_recall(0.8, bands, rows) >= 0.95
    assert lsh_recall(0.8, 9, 13) < 0.45  # datasketch's automatic choice for the same threshold
    assert lsh_recall(0.3, bands, rows) < 0.01  # unrelated pairs rarely become candidates
    for t in (0.5, 0.7, 0.9):
        b, r = lsh_params(t, 128)
        assert b * r <= 128 and lsh_recall(t, b, r) >= 0.95
    assert lsh_params(0.8, 128, min_recall=0.9) == (16, 8)


# ----------------------------------------------------------------------------------------------------------
# The global stage


def run(corpus, sigs, rows=None, **kw):
    texts = corpus["texts"]
    order = np.arange(len(texts)) if rows is None else np.asarray(rows)
    keys = pack_keys(0, order)
    exact = np.array([exact_hash(texts[i]) for i in order], dtype=np.uint64)
    return find_duplicates(keys, exact, sigs[order], **kw)


def test_exact_and_near_duplicates(corpus, sigs):
    texts = corpus["texts"]
    for a, b in corpus["near"]:
        assert 0.85 < jaccard(texts[a], texts[b]) < 1.0
    for a, b in corpus["far"]:
        assert jaccard(texts[a], texts[b]) < 0.5
    res = run(corpus, sigs)
    copies = {b for _, b in corpus["near"]} | {b for _, b in corpus["exact"]}
    # every planted copy dropped, nothing else: no false positive among distinct or far-edited documents
    assert set(unpack_keys(res.drop)[1].tolist()) == copies
    kept_for = dict(
        zip(unpack_keys(res.drop)[1].tolist(), unpack_keys(res.kept_for)[1].tolist(), strict=True)
    )
    for a, b in corpus["near"] + corpus["exact"]:
        assert kept_for[b] == a  # the smallest key of the cluster is kept
    assert res.exact_dropped == len(corpus["exact"]) and res.near_dropped == len(corpus["near"])
    assert res.exact.sum() == res.exact_dropped
    assert res.clusters == len(corpus["near"])
    assert res.verified_pairs >= len(corpus["near"]) and res.candidate_pairs >= res.verified_pairs
    assert (res.bands, res.rows) == lsh_params(0.8, 128)
    assert res.stats()["documents"] == len(texts)


def test_exact_keeps_smallest_key():
    keys = pack_keys([3, 0, 1, 1], [0, 9, 2, 1])
    hashes = [exact_hash(t) for t in ("same text", "Same text!", "other", "SAME  text")]
    sigs = MinHasher().signatures(["same text", "Same text!", "other", "SAME  text"])
    res = find_duplicates(keys, hashes, sigs)
    assert res.drop_pairs() == {(1, 1), (3, 0)}
    assert set(unpack_keys(res.kept_for)[0].tolist()) == {0}  # both kept for (0, 9)
    assert res.exact.all() and res.near_dropped == 0
    # (shard, doc) pairs work as keys too
    pairs = [(3, 0), (0, 9), (1, 2), (1, 1)]
    assert find_duplicates(pairs, hashes, sigs).drop_pairs() == {(1, 1), (3, 0)}
    with pytest.raises(ValueError, match="unique"):
        find_duplicates(pack_keys(0, [1, 1, 2, 3]), hashes, sigs)


def test_order_independent(corpus, sigs):
    ref = run(corpus, sigs)
    rng = np.random.default_rng(5)
    for _ in range(3):
        res = run(corpus, sigs, rows=rng.permutation(len(corpus["texts"])))
        np.testing.assert_array_equal(res.drop, ref.drop)
        np.testing.assert_array_equal(res.kept_for, ref.kept_for)
        np.testing.assert_array_equal(res.exact, ref.exact)
        assert res.stats() == ref.stats()


def test_cluster_resolution_is_transitive_and_deterministic():
    """A chain of near copies (each an edit of the previous one) and a big bucket: one cluster each."""
    rng = np.random.default_rng(3)
    base = make_doc(rng, 600, 601)
    chain = [base]
    for _ in range(30):
        chain.append(edit(chain[-1], 0.004, rng))
    texts = [to_text(w) for w in chain]
    sigs = MinHasher().signatures(texts)
    hashes = [exact_hash(t) for t in texts]
    keys = pack_keys(0, np.arange(len(texts)))
    ref = find_duplicates(keys, hashes, sigs)
    assert ref.drop_set() == set(keys[1:].tolist()) and set(ref.kept_for.tolist()) == {int(keys[0])}
    # a tiny bucket window (huge-bucket path) still links everything, and to the smallest key
    small = find_duplicates(keys, hashes, sigs, bucket_window=2)
    np.testing.assert_array_equal(small.drop, ref.drop)
    np.testing.assert_array_equal(small.kept_for, ref.kept_for)
    assert small.candidate_pairs < ref.candidate_pairs


def test_components_match_reference_union_find():
    rng = np.random.default_rng(0)
    n = 500
    a = rng.integers(0, n, 400)
    b = rng.integers(0, n, 400)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    want = [find(x) for x in range(n)]
    np.testing.assert_array_equal(_components(n, a, b), want)
    np.testing.assert_array_equal(_components(5, np.array([3, 2, 1]), np.array([4, 3, 2])), [0, 1, 1, 1, 1])


def test_parameter_checks(sigs):
    keys = pack_keys(0, np.arange(3))
    with pytest.raises(ValueError):
        find_duplicates(keys, [1, 2, 3], sigs[:3], bands=20, rows=7)  # 140 > 128 permutations
    with pytest.raises(ValueError):
        find_duplicates(keys, [1, 2, 3], sigs[:3], bands=16)
    with pytest.raises(ValueError):
        find_duplicates(keys, [1, 2], sigs[:3])
    empty = find_duplicates(np.empty(0, dtype=np.int64), [], np.empty((0, 128), np.uint32))
    assert len(empty.drop) == 0 and empty.clusters == 0


# ----------------------------------------------------------------------------------------------------------
# Shards: per-shard signatures, then the global stage


def test_shards_equal_single_pass(tmp_path, corpus, hasher, sigs):
    texts = corpus["texts"]
    one = run(corpus, sigs)
    bounds = [0, 23, 61, len(texts)]
    paths = []
    for s in (2, 0, 1):  # shards computed in any order (as workers finish)
        lo, hi = bounds[s], bounds[s + 1]
        path = tmp_path / f"sig-{s:05d}.npz"
        save_signatures(path, np.arange(hi - lo), texts[lo:hi], hasher)
        paths.append(path)
    assert not list(tmp_path.glob("*.tmp"))  # atomic: no temp file left
    keys, exact, loaded = load_signatures(sorted(paths))
    np.testing.assert_array_equal(loaded, sigs)
    np.testing.assert_array_equal(exact, [exact_hash(t) for t in texts])
    three = find_duplicates(keys, exact, loaded)
    shard, doc = unpack_keys(three.drop)
    np.testing.assert_array_equal(np.asarray(bounds)[shard] + doc, unpack_keys(one.drop)[1])
    assert three.stats() == one.stats()
    np.testing.assert_array_equal(
        three.for_shard(1), [i - 23 for i in unpack_keys(one.drop)[1] if 23 <= i < 61]
    )


def test_load_refuses_mixed_settings(tmp_path):
    save_signatures(tmp_path / "a.npz", [0], ["some text here"], MinHasher(num_perm=64))
    save_signatures(tmp_path / "b.npz", [0], ["some text here"], MinHasher(num_perm=64, seed=2))
    with pytest.raises(ValueError, match="settings"):
        load_signatures([tmp_path / "a.npz", tmp_path / "b.npz"])
    keys, _, _ = load_signatures([tmp_path / "a.npz"], shards=[7])
    assert unpack_keys(keys)[0].tolist() == [7]


def test_punctuation_table_cached_per_unicode_version(monkeypatch, tmp_path):
    import sys
    import unicodedata

    import numpy as np

    from llmforge.prep import dedup

    monkeypatch.setenv("LLMFORGE_CACHE_DIR", str(tmp_path))
    dedup._punctuation.cache_clear()
    derived, ascii_table = dedup._punctuation()
    (entry,) = tmp_path.glob(f"punctuation-unicode-{unicodedata.unidata_version}-*")
    for cp in (ord(","), ord("¿"), ord("「"), 0x2014, 0x1F600, ord("a"), ord("€"), 0x0301):
        assert derived[cp] == (unicodedata.category(chr(cp))[0] == "P")
    assert set(ascii_table) == {c for c in range(128) if unicodedata.category(chr(c))[0] == "P"}
    dedup._punctuation.cache_clear()
    assert np.array_equal(dedup._punctuation()[0], derived)  # read back from the entry
    entry.write_bytes(np.array([sys.maxunicode + 5], dtype="<u4").tobytes())  # damaged: derived again
    dedup._punctuation.cache_clear()
    assert np.array_equal(dedup._punctuation()[0], derived)
    dedup._punctuation.cache_clear()
