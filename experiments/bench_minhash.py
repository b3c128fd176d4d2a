"""MinHash dedup benchmark: signature speed, and near-duplicate recall/precision at Jaccard 0.8.

    .venv/bin/python experiments/bench_minhash.py [--speed-docs 200] [--pairs 1000] [--rounds 3]

(a) Signatures/s on the same documents, in one process, methods alternated round by round (timings on
    shared machines drift; medians of the rounds are reported): llmforge's `MinHasher.signatures` vs
    datasketch `MinHash.update` per shingle, `MinHash.update_batch` per document and `MinHash.bulk`. Every
    method starts from the raw text (normalisation and shingling included) and their outputs are checked
    to be identical.
(b) Planted pairs: each base document (300-1000 words, Zipf over a fixed pseudo-word vocabulary) gets one
    variant with words replaced until the true shingle Jaccard hits a target spread evenly (stratified)
    over [0.80, 1.00) (positives) or [0.50, 0.75] (negatives). Labels come from the true Jaccard of the
    shingle sets. Bases are mutually distinct (J ~ 0), so a variant is dropped iff its pair was found.
    Reported: recall over positives, false-positive rate over negatives, precision (equal numbers of each),
    and false drops among bases. Methods: llmforge `find_duplicates` (explicit bands, candidates verified
    by estimated Jaccard), the same without verification, and datasketch `MinHashLSH(threshold=0.8,
    num_perm=128)` with its automatic bands, alone and followed by the same verification.
(c) The global stage's own time on random signatures (banding and sorting cost, no duplicates).
(d) Near-copies as users mean them, on real HTML: the pydoc pages of standard-library modules (what the demo
    crawl holds), text extracted as the pipeline extracts it. Each page gets copies with 1%, 3%, 5% and 10%
    of its words replaced by words drawn from the pages' own vocabulary (`--trials` copies per page and
    rate, one rate per run, originals first so a found copy is dropped for its original). Recall: copies
    dropped in favour of their own page. Negatives: the distinct modules' pages, which share pydoc's
    template; a page dropped, or a copy kept for another module's page, is a false merge. Precision:
    correct drops / all drops. Settings compared: shingle size, number of permutations, bands x rows and
    the verification threshold, including the old defaults (5-grams, 256 perms, verify 0.8) and datasketch's
    FineWeb settings (5-grams, 14x8 of 112 perms, no verification).

    .venv/bin/python experiments/bench_minhash.py --only pages [--modules 150] [--trials 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import numpy as np

from llmforge.prep.dedup import MinHasher, exact_hash, find_duplicates, lsh_params, lsh_recall, shingles

SYLLABLES = "ka lo mi ne ru sa ti vo we xu ya ze bi do fu ga he ji pa qo".split()


def make_vocab(size: int, rng: np.random.Generator) -> np.ndarray:
    words = {"".join(rng.choice(SYLLABLES, size=rng.integers(1, 5))) for _ in range(size * 3)}
    return np.array(sorted(words)[:size])


def ngrams(words: list[str], n: int = 5) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard_words(a: list[str], b: list[str]) -> float:
    sa, sb = ngrams(a), ngrams(b)
    return len(sa & sb) / len(sa | sb)


def variant(words: list[str], target: float, vocab: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Replace a prefix of a random order of positions, its length found by bisection on the Jaccard."""
    positions = rng.permutation(len(words))
    replacement = rng.choice(vocab, size=len(words))

    def edited(k: int) -> list[str]:
        out = list(words)
        for p, w in zip(positions[:k], replacement[:k], strict=True):
            out[p] = str(w)
        return out

    lo, hi = 1, len(words)  # J(edited(k)) is (nearly) non-increasing in k
    while lo < hi:
        mid = (lo + hi) // 2
        if jaccard_words(words, edited(mid)) > target:
            lo = mid + 1
        else:
            hi = mid
    best = min(
        (k for k in (lo - 1, lo) if k >= 1), key=lambda k: abs(jaccard_words(words, edited(k)) - target)
    )
    return edited(best)


# ----------------------------------------------------------------------------------------------------------
# (a) speed


def bench_speed(texts: list[str], rounds: int) -> None:
    from datasketch import MinHash

    hasher = MinHasher(num_perm=128, seed=1)

    def ours():
        return hasher.signatures(texts)

    def per_shingle():
        out = []
        for t in texts:
            m = MinHash(num_perm=128, seed=1)
            for s in shingles(t):
                m.update(s)
            out.append(m.hashvalues)
        return np.array(out)

    def update_batch():
        out = []
        for t in texts:
            m = MinHash(num_perm=128, seed=1)
            m.update_batch(shingles(t))
            out.append(m.hashvalues)
        return np.array(out)

    def bulk():
        return np.array(
            [m.hashvalues for m in MinHash.bulk((shingles(t) for t in texts), num_perm=128, seed=1)]
        )

    methods = {
        "llmforge MinHasher.signatures": ours,
        "datasketch update per shingle": per_shingle,
        "datasketch update_batch": update_batch,
        "datasketch MinHash.bulk": bulk,
    }
    ref = ours()
    times: dict[str, list[float]] = {k: [] for k in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            got = methods[name]()
            times[name].append(time.perf_counter() - t0)
            assert np.array_equal(got, ref), f"{name} differs from MinHasher"
    words = np.mean([len(t.split()) for t in texts])
    print(
        f"\n(a) signatures, {len(texts)} documents of {words:.0f} words on average, 128 permutations, "
        f"{rounds} alternated rounds (median), outputs identical"
    )
    print(
        f"{'method':34s} {'docs/s':>9s} {'shingles/s':>11s} {'vs per-shingle':>15s} {'vs update_batch':>16s}"
    )
    nsh = sum(len(shingles(t)) for t in texts)
    base = statistics.median(times["datasketch update per shingle"])
    batch = statistics.median(times["datasketch update_batch"])
    for name in names:
        t = statistics.median(times[name])
        print(f"{name:34s} {len(texts) / t:9.0f} {nsh / t:11.0f} {base / t:14.1f}x {batch / t:15.1f}x")


# ----------------------------------------------------------------------------------------------------------
# (b) recall and precision


def bench_quality(n_pairs: int, seed: int) -> None:
    from datasketch import MinHash, MinHashLSH

    rng = np.random.default_rng(seed)
    vocab = make_vocab(5000, rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    bases, variants, truth = [], [], []
    t0 = time.perf_counter()
    for i in range(n_pairs):
        words = [str(w) for w in rng.choice(vocab, size=int(rng.integers(300, 1000)), p=zipf)]
        # stratified targets: evenly covering [0.80, 1.00) (even i) and [0.50, 0.75] (odd i)
        lo, hi = (0.80, 1.0) if i % 2 == 0 else (0.50, 0.75)
        target = lo + (hi - lo) * (i // 2 + rng.random()) / ((n_pairs + 1 - i % 2) // 2)
        v = variant(words, target, vocab, rng)
        bases.append(" ".join(words))
        variants.append(" ".join(v))
    for b, v in zip(bases, variants, strict=True):
        sa, sb = set(shingles(b)), set(shingles(v))
        truth.append(len(sa & sb) / len(sa | sb))
    truth = np.array(truth)
    pos = (truth >= 0.8) & (truth < 1.0)
    neg = (truth >= 0.5) & (truth <= 0.75)
    print(
        f"\n(b) {n_pairs} planted pairs ({time.perf_counter() - t0:.1f} s to build): {pos.sum()} positives "
        f"J in [0.80, 1.00) (mean {truth[pos].mean():.3f}), {neg.sum()} negatives J in [0.50, 0.75] "
        f"(mean {truth[neg].mean():.3f}), {(~pos & ~neg).sum()} unlabelled (ignored)"
    )

    texts = bases + variants
    n = n_pairs
    keys = np.arange(2 * n, dtype=np.int64)  # bases first: a found pair drops the variant
    exact = np.array([exact_hash(t) for t in texts], dtype=np.uint64)
    results = []

    def score(name: str, found: np.ndarray, base_drops: int, seconds: float, note: str = "") -> None:
        tp, fp = int((found & pos).sum()), int((found & neg).sum())
        recall = tp / pos.sum()
        fpr = fp / neg.sum()
        precision = tp / (tp + fp) if tp + fp else float("nan")
        results.append((name, recall, fpr, precision, base_drops, seconds, note))

    for num_perm in (128, 256):
        hasher = MinHasher(num_perm=num_perm, seed=1)
        t0 = time.perf_counter()
        sigs = hasher.signatures(texts)
        t_sig = time.perf_counter() - t0
        configs = [(lsh_params(0.8, num_perm), None)]
        if num_perm == 128:
            configs += [((16, 8), None), (lsh_params(0.8, num_perm), 0.0), ((16, 8), 0.78)]
        for (b, r), vt in configs:
            t0 = time.perf_counter()
            res = find_duplicates(keys, exact, sigs, threshold=0.8, bands=b, rows=r, verify_threshold=vt)
            dt = time.perf_counter() - t0
            dropped = np.zeros(2 * n, dtype=bool)
            dropped[res.drop] = True
            verify = "no verification" if vt == 0.0 else f"verify est J >= {0.8 if vt is None else vt}"
            score(
                f"llmforge {b}x{r}, {num_perm} perms, {verify}",
                dropped[n:],
                int(dropped[:n].sum()),
                dt,
                f"S(0.8)={lsh_recall(0.8, b, r):.3f}; signatures {t_sig:.1f} s",
            )
        if num_perm == 128:
            sigs128 = sigs

    # datasketch MinHashLSH with its automatic parameters, on the same (identical) signatures
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    mhs = [MinHash(num_perm=128, seed=1, hashvalues=s, scheme="affine32") for s in sigs128]
    for i in range(n, 2 * n):
        lsh.insert(i, mhs[i])
    cand = np.array([(i + n) in set(lsh.query(mhs[i])) for i in range(n)])
    dt = time.perf_counter() - t0
    est = np.array([mhs[i].jaccard(mhs[i + n]) for i in range(n)])
    name = f"datasketch MinHashLSH auto {lsh.b}x{lsh.r}"
    note = f"S(0.8)={lsh_recall(0.8, lsh.b, lsh.r):.3f}; s = insert + query"
    score(f"{name}, no verification", cand, 0, dt, note)
    score(f"{name}, verify est J >= 0.8", cand & (est >= 0.8), 0, dt, "same verification as llmforge")

    print(
        f"{'method':58s} {'recall':>7s} {'FP rate':>8s} {'precision':>9s} {'base drops':>10s} {'s':>6s}  note"
    )
    for name, recall, fpr, precision, base_drops, seconds, note in results:
        print(f"{name:58s} {recall:7.3f} {fpr:8.3f} {precision:9.3f} {base_drops:10d} {seconds:6.2f}  {note}")

    # recall by true-Jaccard bin for the default configuration
    res = find_duplicates(keys, exact, sigs128, threshold=0.8)
    dropped = np.zeros(2 * n, dtype=bool)
    dropped[res.drop] = True
    found = dropped[n:]
    b, r = lsh_params(0.8, 128)
    print(f"\nllmforge default ({b}x{r}, verify est J >= 0.8, 128 perms) by true Jaccard bin:")
    for lo, hi, closed in (
        (0.5, 0.6, 0),
        (0.6, 0.7, 0),
        (0.7, 0.75, 1),
        (0.8, 0.85, 0),
        (0.85, 0.9, 0),
        (0.9, 0.95, 0),
        (0.95, 1.0, 0),
    ):
        sel = (truth >= lo) & ((truth <= hi) if closed else (truth < hi))
        rate = found[sel].mean() if sel.any() else float("nan")
        print(f"  J in [{lo:.2f}, {hi:.2f}{']' if closed else ')'}: {sel.sum():5d} pairs, found {rate:.3f}")


# ----------------------------------------------------------------------------------------------------------
# (c) global stage time


def bench_global(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 2**32, size=(n, 128), dtype=np.uint32)
    exact = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    keys = rng.permutation(n).astype(np.int64)
    print(f"\n(c) global stage, {n} signatures ({sigs.nbytes / 2**20:.0f} MiB)")
    for case in ("random (no duplicates)", f"+ one templated family of {n // 10} (each value kept w.p. 0.9)"):
        if case.startswith("+"):
            family = np.tile(rng.integers(0, 2**32, 128, dtype=np.uint32), (n // 10, 1))
            noise = rng.random(family.shape) < 0.1
            family[noise] = rng.integers(0, 2**32, int(noise.sum()), dtype=np.uint32)
            sigs[: n // 10] = family
        t0 = time.perf_counter()
        res = find_duplicates(keys, exact, sigs)
        dt = time.perf_counter() - t0
        print(
            f"  {case:62s} {res.bands}x{res.rows}: {dt:6.2f} s, {n / dt:9,.0f} docs/s, "
            f"{res.candidate_pairs} candidates, {res.verified_pairs} verified, {len(res.drop)} dropped"
        )


# ----------------------------------------------------------------------------------------------------------
# (d) near-copies of real pages


RATES = (0.01, 0.03, 0.05, 0.10)


def page_texts(modules: int) -> tuple[list[str], list[str]]:
    """(module names, extracted text of their pydoc pages) for the first `modules` renderable stdlib modules
    (pages of at least 50 words)."""
    from llmforge.prep.demo_warc import render_pages
    from llmforge.prep.document import Document
    from llmforge.prep.extract import Extract

    extract = Extract()
    names, texts = [], []
    for name, html in render_pages(modules):
        doc = extract.process(Document(html, name, {"content_type": "text/html"}))
        if doc is not None and len(doc.text.split()) >= 50:
            names.append(name)
            texts.append(doc.text)
    return names, texts


def edit_words(text: str, rate: float, vocab: list[str], rng: np.random.Generator) -> str:
    """`text` with round(rate * words) of its words replaced by vocabulary words (layout kept)."""
    parts = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them at odd ones
    words = [i for i in range(0, len(parts), 2) if parts[i]]
    for i in rng.choice(words, size=max(1, round(rate * len(words))), replace=False):
        parts[i] = str(vocab[rng.integers(len(vocab))])
    return "".join(parts)


# (label, ngram, num_perm, bands, rows, verify threshold or None for none); bands None: lsh_params
PAGE_SETTINGS = [
    ("old default: 5-gram, 256 perm, 21x12, verify 0.8", 5, 256, 21, 12, 0.8),
    ("FineWeb: 5-gram, 112 perm, 14x8, no verify", 5, 112, 14, 8, None),
    ("5-gram, 256 perm, 32x8, verify 0.7", 5, 256, 32, 8, 0.7),
    ("3-gram, 128 perm, 16x8, verify 0.8", 3, 128, 16, 8, 0.8),
    ("3-gram, 128 perm, 16x8, verify 0.75", 3, 128, 16, 8, 0.75),
    ("3-gram, 128 perm, 16x8, verify 0.7", 3, 128, 16, 8, 0.7),
    ("3-gram, 128 perm, 25x5, verify 0.7", 3, 128, 25, 5, 0.7),
    ("3-gram, 128 perm, 25x5, verify 0.65", 3, 128, 25, 5, 0.65),
    ("3-gram, 128 perm, 32x4, verify 0.6", 3, 128, 32, 4, 0.6),
    ("3-gram, 256 perm, 51x5, verify 0.65", 3, 256, 51, 5, 0.65),
]


def bench_pages(modules: int, trials: int, seed: int, only: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    names, pages = page_texts(modules)
    n = len(pages)
    vocab = sorted({w for p in pages for w in p.split()})
    rng = np.random.default_rng(seed)
    sets = {rate: [edit_words(p, rate, vocab, rng) for _ in range(trials) for p in pages] for rate in RATES}
    words = np.array([len(p.split()) for p in pages])
    print(
        f"\n(d) {n} pydoc pages (extracted text, {np.median(words):.0f} words median, {words.min()}-"
        f"{words.max()}), {trials} copies per page and edit rate ({time.perf_counter() - t0:.1f} s to build)"
    )
    for ngram in (3, 5):
        true_j = {}
        for rate, copies in sets.items():
            js = []
            for i, c in enumerate(copies[: 2 * n]):
                sa, sb = set(shingles(pages[i % n], ngram)), set(shingles(c, ngram))
                js.append(len(sa & sb) / len(sa | sb))
            true_j[rate] = np.array(js)
        cross = []
        for i in range(0, n - 1, 2):
            sa, sb = set(shingles(pages[i], ngram)), set(shingles(pages[i + 1], ngram))
            cross.append(len(sa & sb) / len(sa | sb))
        print(
            f"  true {ngram}-gram Jaccard of copy and page: "
            + ", ".join(f"{r:.0%} edited {j.mean():.3f} (min {j.min():.3f})" for r, j in true_j.items())
            + "; 5th percentile: "
            + ", ".join(f"{r:.0%} {np.percentile(j, 5):.3f}" for r, j in true_j.items())
            + f"; between neighbouring modules' pages: max {max(cross):.3f}"
        )
    grams = [set(shingles(p, 3)) for p in pages]
    same_content = {  # distinct modules whose pages are near-copies themselves (true 3-gram J >= 0.8)
        (i, j)
        for i in range(n)
        for j in range(i + 1, n)
        if len(grams[i] & grams[j]) >= 0.8 * len(grams[i] | grams[j])
    }
    print(
        "  distinct modules whose pages have a true 3-gram Jaccard >= 0.8 (their merge is counted apart): "
        + (", ".join(f"{names[i]}/{names[j]}" for i, j in sorted(same_content)) or "none")
    )
    header = f"  {'setting':52s}" + "".join(f" {f'recall {r:.0%}':>11s}" for r in RATES)
    print(header + f" {'precision':>9s} {'precision*':>10s} {'s':>6s}  distinct modules merged")
    for label, ngram, num_perm, bands, rows, vt in PAGE_SETTINGS:
        if only and not any(o in label for o in only):
            continue
        hasher = MinHasher(num_perm=num_perm, ngram=ngram, seed=1)
        t0 = time.perf_counter()
        page_sigs = hasher.signatures(pages)
        recalls, correct, wrong, merged, apart = [], 0, 0, set(), 0
        for rate in RATES:
            copies = sets[rate]
            sigs = np.concatenate([page_sigs, hasher.signatures(copies)])
            texts_exact = [exact_hash(t) for t in pages + copies]
            keys = np.arange(len(sigs), dtype=np.int64)  # pages first: a found copy is dropped for its page
            res = find_duplicates(
                keys,
                np.array(texts_exact, dtype=np.uint64),
                sigs,
                threshold=vt or 0.8,
                bands=bands,
                rows=rows,
                verify_threshold=0.0 if vt is None else vt,
            )
            own = np.arange(len(copies)) % n  # each copy's page
            page_of = np.concatenate([np.arange(n), own])  # of every document: its page
            kept = dict(zip(res.drop.tolist(), res.kept_for.tolist(), strict=True))
            found = np.array([n + j in kept and page_of[kept[n + j]] == own[j] for j in range(len(copies))])
            recalls.append(found.mean())
            for d, k in kept.items():  # right: kept for its own page (or a copy of it); wrong: another page
                page, survivor = int(page_of[d]), int(page_of[k])
                if page == survivor:
                    correct += 1
                else:
                    wrong += 1
                    apart += (min(page, survivor), max(page, survivor)) in same_content
                    merged.add(tuple(sorted((names[page], names[survivor]))))
        precision = correct / (correct + wrong) if correct + wrong else float("nan")
        strict = correct / (correct + wrong - apart) if correct + wrong - apart else float("nan")
        print(
            f"  {label:52s}"
            + "".join(f" {r:11.3f}" for r in recalls)
            + f" {precision:9.4f} {strict:10.4f} {time.perf_counter() - t0:6.1f}  "
            + (", ".join("/".join(m) for m in sorted(merged)) or "none")
        )
    print("  precision*: merges of modules whose pages are near-copies themselves (listed above) not counted")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speed-docs", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--global-docs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modules", type=int, default=150, help="(d) pydoc pages")
    ap.add_argument("--trials", type=int, default=3, help="(d) copies per page and edit rate")
    ap.add_argument("--only", choices=["pages"], default=None, help="run (d) alone")
    ap.add_argument("--settings", nargs="*", default=None, help="(d): only settings whose label has one")
    args = ap.parse_args()
    if args.only == "pages":
        bench_pages(args.modules, args.trials, args.seed, args.settings)
        return

    rng = np.random.default_rng(args.seed)
    vocab = make_vocab(5000, rng)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    texts = []
    for _ in range(args.speed_docs):
        words = rng.choice(vocab, size=int(rng.integers(300, 1000)), p=zipf)
        # sentences with capitals and punctuation, as crawled text has
        texts.append(
            ". ".join(" ".join(words[i : i + 12]).capitalize() for i in range(0, len(words), 12)) + "."
        )
    bench_speed(texts, args.rounds)
    bench_quality(args.pairs, args.seed)
    bench_global(args.global_docs, args.seed)
    bench_pages(args.modules, args.trials, args.seed)


if __name__ == "__main__":
    main()
