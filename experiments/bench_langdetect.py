"""langdetect (pure Python) vs langdetect-rs (Rust port): documents per second and identical answers.

Both backends run in this one process, through the function `LanguageFilter` uses
(`llmforge.prep.filters.detect_language`: a fresh seeded detector per document), on the same documents,
alternating rounds because absolute speed drifts between processes and over time. Documents: Python's
standard-library documentation cut to ``--chars`` characters (English prose with code, the embedded corpus
every machine has) plus the multilingual probe texts of `filters.LANGUAGE_PROBES`. Profile loading is done
before timing. Prints docs/s of each (median over rounds), the ratio, and how many answers were identical
(same languages and bit-identical probabilities), then one JSON line for the ledger.

    python experiments/bench_langdetect.py [--docs 300 --chars 5000 --rounds 3 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmforge.prep.filters import LANGUAGE_PROBES, _factory, detect_language  # noqa: E402
from llmforge.prep.text import stdlib_documents  # noqa: E402


def corpus(n_docs: int, chars: int) -> list[str]:
    """`n_docs` documents of ~`chars` characters: consecutive module docs joined, cut at a line break."""
    docs, buf = [], ""
    for _, text in stdlib_documents():
        buf = f"{buf}\n\n{text}" if buf else text
        while len(buf) >= chars and len(docs) < n_docs:
            cut = buf.rfind("\n", chars // 2, chars) + 1 or chars
            docs.append(buf[:cut].strip())
            buf = buf[cut:].lstrip()
        if len(docs) == n_docs:
            break
    return docs + list(LANGUAGE_PROBES)


def timed(texts: list[str], seed: int, backend: str, min_seconds: float) -> tuple[float, list]:
    """Seconds per pass over `texts` (passes repeated until `min_seconds`), and the answers."""
    passes, start = 0, time.perf_counter()
    while True:
        answers = [detect_language(t, seed, backend) for t in texts]
        passes += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / passes, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--min-seconds", type=float, default=0.5, help="repeat a round's pass until this long"
    )
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--chars", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = corpus(args.docs, args.chars)
    backends = ("langdetect", "langdetect_rs")
    for backend in backends:
        _factory(backend)  # load profiles outside the timing
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    answers: dict[str, list] = {}
    for r in range(args.rounds):
        for backend in backends if r % 2 == 0 else backends[::-1]:
            dt, out = timed(texts, args.seed, backend, args.min_seconds)
            seconds[backend].append(dt)
            answers.setdefault(backend, out)
            if out != answers[backend]:
                raise SystemExit(f"{backend} is not deterministic across rounds")

    py, rs = answers["langdetect"], answers["langdetect_rs"]
    identical = sum(a == b for a, b in zip(py, rs, strict=True))
    langs = sum(a is not None and b is not None and a[0][0] == b[0][0] for a, b in zip(py, rs, strict=True))
    rate = {b: len(texts) / statistics.median(s) for b, s in seconds.items()}
    chars = sum(map(len, texts)) / len(texts)
    print(f"{len(texts)} documents, {chars:.0f} chars on average, seed {args.seed}, {args.rounds} rounds")
    for b in backends:
        print(
            f"  {b:14s} {rate[b]:9.1f} docs/s  (s/pass by round: {', '.join(f'{s:.3f}' for s in seconds[b])})"
        )
    print(f"  ratio langdetect_rs / langdetect: {rate['langdetect_rs'] / rate['langdetect']:.1f}x")
    print(
        f"  identical answers (languages and probabilities): {identical}/{len(texts)}; "
        f"same best language: {langs}/{sum(a is not None for a in py)}"
    )
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    print(json.dumps({
        "bench": "langdetect", "commit": commit, "docs": len(texts), "mean_chars": round(chars),
        "langdetect_docs_per_s": round(rate["langdetect"], 1),
        "langdetect_rs_docs_per_s": round(rate["langdetect_rs"], 1),
        "ratio": round(rate["langdetect_rs"] / rate["langdetect"], 1),
        "identical": identical, "total": len(texts),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
