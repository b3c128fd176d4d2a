"""Document filters of the data stage: each keeps or drops a document and says why.

Every filter is a `Filter` (`filter(doc) -> (keep, reason)`, see `llmforge.prep.step`): the step counts
drops per reason and keeps a capped sample of each. A threshold set to ``None`` switches that one rule off;
`build_filters` switches whole filters on and off from a plain config dict.

Order (`FILTER_ORDER`, cheapest first, so the expensive filters see fewer documents; cost per ~5 KB
document measured on one shared core of the project's machines):

=================  ====================  ================================================  ===============
config key         class                 defaults                                          cost
=================  ====================  ================================================  ===============
``word_count``     `WordCountFilter`     50 <= words <= 100,000                            ~0.05 ms
``alnum``          `AlphanumericFilter`  >= 0.60 of non-space chars are letters/digits     ~0.3 ms
``language``       `LanguageFilter`      ["en"], top probability >= 0.65, seed 0           ~0.3 ms (Rust),
                                                                                           ~12 ms (Python)
``gopher_quality`` `GopherQualityFilter` Gopher's quality rules (below)                    ~0.5 ms
``repetition``     `RepetitionFilter`    Gopher's repetition thresholds (below)            ~1 ms
``c4``             `C4LineFilter`        C4's line rules; OFF by default; edits the text   ~0.3 ms
``decontaminate``  `DecontaminateFilter` OFF by default; 13-grams of eval tasks' items     ~0.1 ms
=================  ====================  ================================================  ===============

With the Rust backend, language detection costs less than the repetition measures, and on a real crawl it
drops about half of the documents, so it runs before the Gopher rules (which then also know each document's
language for the English stop-word rule); ``build_filters(cfg, order=...)`` takes another order.

Sources of the defaults:

- Word count 50..100,000, and all of `GopherQualityFilter`: Rae et al. 2021, "Scaling Language Models:
  Methods, Analysis & Insights from Training Gopher", appendix A.1.1 (MassiveWeb quality filter): mean word
  length 3..10 characters; hash-to-word and ellipsis-to-word ratios <= 0.1; <= 90% of lines start with a
  bullet; <= 30% of lines end with an ellipsis; >= 80% of words contain an alphabetic character; >= 2
  occurrences of the English stop words the, be, to, of, and, that, have, with.
- `RepetitionFilter`: the same paper, Table A1: duplicate line fraction 0.30, duplicate paragraph fraction
  0.30, duplicate line character fraction 0.20, duplicate paragraph character fraction 0.20, top 2/3/4-gram
  character fraction 0.20/0.18/0.16, duplicate 5..10-gram character fraction 0.15, 0.14, 0.13, 0.12, 0.11,
  0.10. How each value is measured is spelled out in `repetition_stats`.
- `LanguageFilter` threshold 0.65: FineWeb (Penedo et al. 2024) keeps English at a language score >= 0.65
  (their detector is fastText; C4, which used langdetect as here, kept pages at >= 0.99 — stricter, and it
  drops much mixed-language and short text). Seeded as the C4 code does (seed 0) so results are
  reproducible.
- `AlphanumericFilter` 0.60: our own choice (the seed chapter's 0.8 over *all* characters counted spaces and
  rejected ordinary prose). Over non-space characters (combining marks count as letters, see `alnum_ratio`),
  measured here: prose 0.93-0.98 in every script we tried (English, German, French, Spanish, Russian 0.97;
  Japanese, Chinese 0.93, their punctuation being full characters; Hindi 0.98 — 0.62 if its vowel signs
  were not counted, which is why they are), Python's documentation (prose with code samples) 0.71-0.99
  (1st percentile 0.79), dense code or JSON 0.25-0.45, table rules, separators and emoji strings 0-0.25.
  0.60 keeps prose with a wide margin and drops text that is mostly symbols.
- `C4LineFilter`: Raffel et al. 2020 (T5), section 2.2, with the numbers of the code that built C4
  (tensorflow_datasets ``c4_utils.py``): keep lines ending in . ? ! or a closing quote, not in an ellipsis;
  keep lines of >= 5 words; drop lines with "javascript" or policy/cookie notices, and lines with a word
  over 1000 characters; drop pages containing "lorem ipsum" or "{"; drop pages left with < 3 sentences.
  (datatrove's port uses 3 words per line and 5 sentences, the paper's prose swapped; we follow the code.)

Words are whitespace-separated tokens throughout, as in Gopher and C4. That is right for languages written
with spaces; text in Chinese or Japanese has few spaces, so the word-based rules (word count, mean word
length, n-gram repetition) do not describe it — run them only where the target languages use spaces.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from importlib import metadata
from itertools import filterfalse, repeat
from typing import Any

import numpy as np

from llmforge.prep import cache
from llmforge.prep.decontaminate import DecontaminateFilter
from llmforge.prep.document import Document
from llmforge.prep.step import Filter, PipelineStep

log = logging.getLogger(__name__)

STOP_WORDS_EN = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher, appendix A.1.1
# Characters stripped from both ends of a token before it counts as a word: ASCII and common Unicode
# punctuation, quotes and dashes. A token made only of these is not a word.
WORD_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»‹›„‚…–—―·•¡¿、。，！？：；（）【】「」『』《》〈〉"
BULLETS = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "∙", "➢", "➤", "►", "▶", "-", "*", "–")
ELLIPSES = ("...", "…")


def last_text_cache(fn: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    """Remember `fn`'s result for the last text it saw: the filters run one after another on the same
    document, and several need its words or lines. The result is shared: callers must not modify it."""
    last: list[tuple[str | None, list[str]]] = [(None, [])]  # holding the text keeps its id from reuse

    @functools.wraps(fn)
    def cached(text: str) -> list[str]:
        seen, result = last[0]  # one tuple, swapped whole: safe across threads
        if seen is not text:
            result = fn(text)
            last[0] = (text, result)
        return result

    return cached


@last_text_cache
def split_words(text: str) -> list[str]:
    """``text.split()``: whitespace tokens."""
    return text.split()


@last_text_cache
def words_of(text: str) -> list[str]:
    """Whitespace tokens with surrounding punctuation stripped; tokens that were only punctuation go."""
    return list(filter(None, map(str.strip, split_words(text), repeat(WORD_PUNCT))))


@last_text_cache
def nonblank_lines(text: str) -> list[str]:
    return [line for line in map(str.strip, text.splitlines()) if line]


_alpha_chars = functools.partial(map, str.isalpha)  # word -> is each character a letter


def _check_range(lo: float | None, hi: float | None, what: str) -> None:
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{what}: minimum {lo} is above maximum {hi}")


# ----------------------------------------------------------------------------------------------------------
# 1. word count


class WordCountFilter(Filter):
    """Keep documents with ``min_words <= words <= max_words`` (whitespace tokens).

    Defaults 50 and 100,000 from Gopher (appendix A.1.1). Reasons: ``too_few_words``, ``too_many_words``.
    """

    name = "word_count"

    def __init__(self, min_words: int | None = 50, max_words: int | None = 100_000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_range(min_words, max_words, self.name)
        self.min_words = min_words
        self.max_words = max_words

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        n = len(split_words(doc.text))
        if self.min_words is not None and n < self.min_words:
            return False, "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return False, "too_many_words"
        return True, None


# ----------------------------------------------------------------------------------------------------------
# 2. alphanumeric ratio

# Non-space characters that are not word characters, plus "_" (which \w includes).
_NON_WORD = re.compile(r"[^\w\s]|_")
# The ASCII characters `_NON_WORD` does not match: letters, digits and what `re` calls whitespace.
_ASCII_WORD_OR_SPACE = bytes(c for c in range(128) if not _NON_WORD.match(chr(c)))


def alnum_ratio(text: str) -> float:
    """Share of the non-space characters that are letters, digits or combining marks (any script).

    `str.isalnum` is Unicode-aware but says False for combining marks (category M: Devanagari vowel
    signs, Thai tone marks, decomposed accents); they are parts of words, so they count as alphanumeric
    here. Spaces do not count at all (the seed chapter's version divided by all characters). 0.0 for a text
    without non-space characters.
    """
    if text.isascii():  # no combining marks; one C pass deletes what `_NON_WORD` would not find
        symbols, nonspace = len(text.encode().translate(None, _ASCII_WORD_OR_SPACE)), _ascii_nonspace(text)
    else:
        symbols = sum(1 for c in _NON_WORD.findall(text) if unicodedata.category(c)[0] != "M")
        nonspace = len(text) - sum(map(str.isspace, text))
    return (nonspace - symbols) / nonspace if nonspace else 0.0


def _ascii_nonspace(text: str) -> int:
    return len(text) - sum(text.count(c) for c in " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f")  # str.isspace


class AlphanumericFilter(Filter):
    """Drop documents whose `alnum_ratio` (over non-space characters) is below ``min_ratio``.

    Default 0.60: see the module docstring (prose of every script scores >= 0.85). Reason: ``alnum_ratio``.
    """

    name = "alnum"

    def __init__(self, min_ratio: float = 0.60, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.min_ratio = min_ratio

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        if alnum_ratio(doc.text) < self.min_ratio:
            return False, "alnum_ratio"
        return True, None


# ----------------------------------------------------------------------------------------------------------
# 3. Gopher quality rules


class GopherQualityFilter(Filter):
    """The quality rules of Gopher's MassiveWeb (Rae et al. 2021, appendix A.1.1). ``None`` disables a rule.

    Words are `words_of(text)`: whitespace tokens with surrounding punctuation stripped. Lines are the
    non-blank lines. Rules and reasons, in the order they are checked:

    - ``min_words``/``max_words`` (50 / 100,000) -> ``gopher_too_few_words`` / ``gopher_too_many_words``
    - mean word length in [``min_mean_word_length``, ``max_mean_word_length``] (3 / 10 characters)
      -> ``gopher_mean_word_length``
    - ``max_symbol_word_ratio`` (0.1): "#" count / words and ellipsis ("..." or "…") count / words, each
      -> ``gopher_symbol_ratio``
    - ``max_bullet_lines_ratio`` (0.9): lines starting with a bullet (`BULLETS`) -> ``gopher_bullet_lines``
    - ``max_ellipsis_lines_ratio`` (0.3): lines ending with an ellipsis -> ``gopher_ellipsis_lines``
    - ``min_alpha_words_ratio`` (0.8): words containing an alphabetic character -> ``gopher_alpha_words``
    - ``min_stop_words`` (2): occurrences (case-insensitive, whole words) of ``stop_words`` (the Gopher
      list, `STOP_WORDS_EN`) -> ``gopher_stop_words``. English only: when a document's
      ``metadata["language"]`` is known and not in ``stop_words_languages`` (default ("en",)) the rule is
      skipped; in the default order this filter runs before language detection, so `build_filters` turns
      the rule off when the language filter targets no language of ``stop_words_languages``.
    """

    name = "gopher_quality"

    def __init__(
        self,
        min_words: int | None = 50,
        max_words: int | None = 100_000,
        min_mean_word_length: float | None = 3,
        max_mean_word_length: float | None = 10,
        max_symbol_word_ratio: float | None = 0.1,
        max_bullet_lines_ratio: float | None = 0.9,
        max_ellipsis_lines_ratio: float | None = 0.3,
        min_alpha_words_ratio: float | None = 0.8,
        min_stop_words: int | None = 2,
        stop_words: Sequence[str] = STOP_WORDS_EN,
        stop_words_languages: Sequence[str] | None = ("en",),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_range(min_words, max_words, "gopher words")
        _check_range(min_mean_word_length, max_mean_word_length, "gopher mean word length")
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_alpha_words_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = tuple(stop_words)
        self.stop_words_languages = None if stop_words_languages is None else tuple(stop_words_languages)
        alternatives = "|".join(sorted((re.escape(w) for w in self.stop_words), key=len, reverse=True))
        self._stop_re = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text
        words = words_of(text)
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return False, "gopher_too_few_words"
        if self.max_words is not None and n > self.max_words:
            return False, "gopher_too_many_words"
        if n == 0:
            return False, "gopher_too_few_words"

        mean_len = sum(map(len, words)) / n
        if (self.min_mean_word_length is not None and mean_len < self.min_mean_word_length) or (
            self.max_mean_word_length is not None and mean_len > self.max_mean_word_length
        ):
            return False, "gopher_mean_word_length"

        if self.max_symbol_word_ratio is not None:
            ellipses = text.count("...") + text.count("…")
            if max(text.count("#"), ellipses) / n > self.max_symbol_word_ratio:
                return False, "gopher_symbol_ratio"

        if self.max_bullet_lines_ratio is not None or self.max_ellipsis_lines_ratio is not None:
            lines = nonblank_lines(text)
            if lines:
                if self.max_bullet_lines_ratio is not None:
                    bullets = sum(1 for line in lines if line.startswith(BULLETS))
                    if bullets / len(lines) > self.max_bullet_lines_ratio:
                        return False, "gopher_bullet_lines"
                if self.max_ellipsis_lines_ratio is not None:
                    ellipsis_lines = sum(1 for line in lines if line.endswith(ELLIPSES))
                    if ellipsis_lines / len(lines) > self.max_ellipsis_lines_ratio:
                        return False, "gopher_ellipsis_lines"

        if self.min_alpha_words_ratio is not None:
            # Most words are all letters (one C call); only the rest need a character scan.
            alpha = sum(map(str.isalpha, words))
            alpha += sum(map(any, map(_alpha_chars, filterfalse(str.isalpha, words))))
            if alpha / n < self.min_alpha_words_ratio:
                return False, "gopher_alpha_words"

        if self.min_stop_words and self._stop_words_apply(doc):
            found = 0
            for _ in self._stop_re.finditer(text):
                found += 1
                if found >= self.min_stop_words:
                    break
            if found < self.min_stop_words:
                return False, "gopher_stop_words"
        return True, None

    def _stop_words_apply(self, doc: Document) -> bool:
        language = doc.metadata.get("language")
        if language is None or language == "unknown" or self.stop_words_languages is None:
            return True
        return language in self.stop_words_languages


# ----------------------------------------------------------------------------------------------------------
# 4. Gopher repetition

_PARAGRAPH_SPLIT = re.compile(r"\n[^\S\n]*\n\s*")
TOP_NGRAMS = ((2, 0.20), (3, 0.18), (4, 0.16))
DUP_NGRAMS = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


def _repeats(items: list[str]) -> tuple[int, int, int]:
    """(number of items that repeat an earlier one, their characters, characters of all items)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars, sum(map(len, items))


def _covered_chars(starts: np.ndarray, n: int, lengths: np.ndarray) -> int:
    """Characters of the words covered by n-grams starting at `starts` (unique, sorted); overlaps once."""
    if starts.size == 0:
        return 0
    delta = np.zeros(lengths.size + 1, dtype=np.int32)
    delta[starts] += 1
    delta[starts + n] -= 1
    covered = np.cumsum(delta[:-1]) > 0
    return int(lengths[covered].sum())


def _ngram_fractions(words: list[str], top_ns: Iterable[int], dup_ns: Iterable[int]):
    """Yield (kind, n, fraction) for n = 2, 3, ... up to the largest n asked, lazily (callers stop early).

    Exact (no hashing): each n-gram gets a dense integer id from the pair (id of its first n-1 words, id of
    its last word), one `np.unique` per n. Word ids and n-gram ids are below the word count L, so the pair
    key ``id * L + word`` fits in int64 for any document. Only candidates are looked at: an n-gram can
    repeat only where its first n-1 words repeat, so each n keeps the start positions whose (n-1)-gram
    occurs more than once (usually a small, shrinking share of the text).
    """
    top_ns, dup_ns = set(top_ns), set(dup_ns)
    max_n = max(top_ns | dup_ns, default=0)
    L = len(words)
    if max_n < 2 or L < 2:
        return
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}  # ids in order of first occurrence
    word_ids = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=L)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=L)
    total = int(lengths.sum())
    if total == 0:
        return
    csum = np.concatenate(([0], np.cumsum(lengths)))
    pos = np.flatnonzero(np.bincount(word_ids)[word_ids] > 1)  # starts of candidate (n-1)-grams
    ids = word_ids[pos]  # their (n-1)-gram ids
    for n in range(2, max_n + 1):
        if L < n:
            return
        inside = pos <= L - n
        pos, ids = pos[inside], ids[inside]
        if pos.size == 0:  # no (n-1)-gram repeats, so no n-gram can: every later fraction is 0
            for m in range(n, max_n + 1):
                if m in top_ns:
                    yield "top", m, 0.0
                if m in dup_ns:
                    yield "dup", m, 0.0
            return
        key = ids * L + word_ids[pos + n - 1]
        _, first, ids, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
        ids = ids.reshape(-1)
        repeated = counts[ids] > 1
        if n in top_ns:
            frac = 0.0
            if counts.max() > 1:
                # the most frequent n-gram; ties go to the most characters, then to the earliest
                best = np.flatnonzero(counts == counts.max())
                starts = pos[first[best]]
                chars = csum[starts + n] - csum[starts]
                best, starts = best[chars == chars.max()], starts[chars == chars.max()]
                top = best[np.argmin(starts)]
                frac = _covered_chars(pos[ids == top], n, lengths) / total
            yield "top", n, frac
        if n in dup_ns:
            later = first[ids] != np.arange(ids.size)  # occurrences after an n-gram's first
            yield "dup", n, _covered_chars(pos[later], n, lengths) / total
        pos, ids = pos[repeated], ids[repeated]


def repetition_stats(
    text: str, top_ngrams: Iterable[int] = (2, 3, 4), dup_ngrams: Iterable[int] = range(5, 11)
) -> dict[str, float]:
    """All of Gopher's repetition measures of a text (for analysis; the filter stops at the first failure).

    Definitions (Rae et al. 2021, appendix A.1.1 / Table A1, which leave details open). As in datatrove's
    ``GopherRepetitionFilter``, an item is a duplicate when it repeats an earlier one (the first occurrence
    is the original). Unlike it: blank lines are not lines (datatrove's ``splitlines`` counts them, so text
    with blank lines between paragraphs scores as repetitive), overlapping n-grams are counted exactly
    (datatrove skips ahead greedily), and n-gram characters are word characters on both sides of the ratio
    (datatrove divides joined n-grams, spaces included, by the whole text's length).

    - lines are the non-blank lines, stripped; paragraphs are separated by blank lines, stripped. (Blank
      lines are not lines: a text with one blank line between paragraphs is not "duplicate lines".)
    - ``dup_line_frac``: lines equal to an earlier line / lines. ``dup_line_char_frac``: characters of those
      lines / characters of all lines. Same for paragraphs (``dup_para_frac``, ``dup_para_char_frac``).
    - words are whitespace tokens (case and punctuation kept); the characters of n-grams are the characters
      of their words (whitespace not counted), divided by the characters of all words.
    - ``top_{n}gram_char_frac`` (n = 2, 3, 4): characters covered by all occurrences of the most frequent
      n-gram (ties: most characters, then earliest), counting overlapping occurrences' characters once; 0
      when no n-gram occurs twice.
    - ``dup_{n}gram_char_frac`` (n = 5..10): characters covered by n-gram occurrences that repeat an earlier
      occurrence (the first occurrence is the original, as for lines), each character counted once however
      many such n-grams overlap it.
    """
    out: dict[str, float] = {}
    paragraphs = [p for p in _PARAGRAPH_SPLIT.split(text.strip()) if p]
    count, chars, total = _repeats(paragraphs)
    out["dup_para_frac"] = count / len(paragraphs) if paragraphs else 0.0
    out["dup_para_char_frac"] = chars / total if total else 0.0
    lines = nonblank_lines(text)
    count, chars, total = _repeats(lines)
    out["dup_line_frac"] = count / len(lines) if lines else 0.0
    out["dup_line_char_frac"] = chars / total if total else 0.0
    top_ngrams, dup_ngrams = tuple(top_ngrams), tuple(dup_ngrams)
    for n in top_ngrams:
        out[f"top_{n}gram_char_frac"] = 0.0
    for n in dup_ngrams:
        out[f"dup_{n}gram_char_frac"] = 0.0
    for kind, n, frac in _ngram_fractions(split_words(text), top_ngrams, dup_ngrams):
        out[f"{kind}_{n}gram_char_frac"] = frac
    return out


class RepetitionFilter(Filter):
    """Gopher's repetition removal (Rae et al. 2021, Table A1); measures as in `repetition_stats`.

    A document is dropped when a measure is *above* its threshold; ``None`` disables a measure.
    ``top_ngrams``/``dup_ngrams`` are ((n, max_fraction), ...). Reasons: ``dup_para_frac``,
    ``dup_para_char_frac``, ``dup_line_frac``, ``dup_line_char_frac``, ``top_{n}gram_char_frac``,
    ``dup_{n}gram_char_frac``; checked in that order (cheap ones first), n-grams by increasing n.
    """

    name = "repetition"

    def __init__(
        self,
        dup_line_frac: float | None = 0.30,
        dup_para_frac: float | None = 0.30,
        dup_line_char_frac: float | None = 0.20,
        dup_para_char_frac: float | None = 0.20,
        top_ngrams: Sequence[Sequence[float]] | Mapping[int, float] = TOP_NGRAMS,
        dup_ngrams: Sequence[Sequence[float]] | Mapping[int, float] = DUP_NGRAMS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_ngrams = _ngram_thresholds(top_ngrams)
        self.dup_ngrams = _ngram_thresholds(dup_ngrams)

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        text = doc.text
        if self.dup_para_frac is not None or self.dup_para_char_frac is not None:
            paragraphs = [p for p in _PARAGRAPH_SPLIT.split(text.strip()) if p]
            if paragraphs:
                count, chars, total = _repeats(paragraphs)
                if self.dup_para_frac is not None and count / len(paragraphs) > self.dup_para_frac:
                    return False, "dup_para_frac"
                if self.dup_para_char_frac is not None and total and chars / total > self.dup_para_char_frac:
                    return False, "dup_para_char_frac"
        if self.dup_line_frac is not None or self.dup_line_char_frac is not None:
            lines = nonblank_lines(text)
            if lines:
                count, chars, total = _repeats(lines)
                if self.dup_line_frac is not None and count / len(lines) > self.dup_line_frac:
                    return False, "dup_line_frac"
                if self.dup_line_char_frac is not None and total and chars / total > self.dup_line_char_frac:
                    return False, "dup_line_char_frac"
        if self.top_ngrams or self.dup_ngrams:
            limits = {("top", n): v for n, v in self.top_ngrams.items()}
            limits.update({("dup", n): v for n, v in self.dup_ngrams.items()})
            for kind, n, frac in _ngram_fractions(split_words(text), self.top_ngrams, self.dup_ngrams):
                if frac > limits[kind, n]:
                    return False, f"{kind}_{n}gram_char_frac"
        return True, None


def _ngram_thresholds(spec: Sequence[Sequence[float]] | Mapping[int, float] | None) -> dict[int, float]:
    """((n, frac), ...) or {n: frac} -> {n: frac}, without the disabled (None) ones."""
    if not spec:
        return {}
    items = spec.items() if isinstance(spec, Mapping) else spec
    out = {}
    for n, frac in items:
        if int(n) < 2:
            raise ValueError(f"n-gram size must be >= 2, got {n}")
        if frac is not None:
            out[int(n)] = float(frac)
    return out


# ----------------------------------------------------------------------------------------------------------
# 5. language

BACKENDS = ("auto", "langdetect", "langdetect_rs")
UNKNOWN_LANGUAGE = "unknown"

# Texts on which "auto" checks, once per process, that langdetect_rs answers exactly as langdetect does.
LANGUAGE_PROBES = (
    "The committee will publish its report next week, after the hearings have ended.",
    "Der Ausschuss wird seinen Bericht nächste Woche veröffentlichen, wenn die Anhörungen vorbei sind.",
    "Le comité publiera son rapport la semaine prochaine, une fois les auditions terminées.",
    "El comité publicará su informe la semana próxima, cuando terminen las audiencias.",
    "Комитет опубликует свой доклад на следующей неделе, после окончания слушаний.",
    "委員会は公聴会が終わった後、来週報告書を公表する予定です。",
    "委员会将在听证会结束后于下周发布报告。",
    "ok",
)

# backend -> (loaded DetectorFactory, its LangDetectException class, its "no features" error code)
_FACTORIES: dict[str, tuple[Any, type[Exception], int]] = {}
_AUTO_BACKEND: str | None = None


def _factory(backend: str) -> tuple[Any, type[Exception], int]:
    """The loaded profile factory of a backend, once per process (loading takes ~0.8 s in Python)."""
    if backend not in _FACTORIES:
        if backend == "langdetect":
            from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
            from langdetect.lang_detect_exception import ErrorCode, LangDetectException
        elif backend == "langdetect_rs":
            from langdetect_rs.detector_factory import PROFILES_DIRECTORY, DetectorFactory
            from langdetect_rs.lang_detect_exception import ErrorCode, LangDetectException
        else:
            raise ValueError(f"unknown language backend {backend!r}; choose one of {BACKENDS}")
        factory = DetectorFactory()
        factory.load_profile(PROFILES_DIRECTORY)
        _FACTORIES[backend] = (factory, LangDetectException, ErrorCode.CantDetectError)
    return _FACTORIES[backend]


def detect_language(text: str, seed: int = 0, backend: str = "langdetect") -> list[tuple[str, float]] | None:
    """langdetect's ``detect_langs``, deterministic: [(language, probability), ...] best first (languages
    above 0.1, so possibly empty), or None when the text has no features (empty, digits or symbols only).

    langdetect draws random n-gram samples: each `Detector` owns a ``random.Random`` that it seeds with the
    factory's seed when it detects (langdetect 1.0.9, ``Detector._detect_block``); with no seed it draws
    from ``os.urandom`` and results vary between calls. Here every call creates a fresh detector from a
    private factory and seeds it with ``seed``, so a text's result depends only on the text and the seed —
    not on which documents came before, nor on the process — and no global (``DetectorFactory.seed``) is
    touched.
    """
    if backend == "auto":
        backend = resolve_backend("auto")
    factory, error, no_features = _factory(backend)
    detector = factory.create()
    detector.seed = seed
    detector.append(text)
    try:
        langs = detector.get_probabilities()
    except error as exc:
        if exc.code == no_features:
            return None
        raise
    return [(lang.lang, lang.prob) for lang in langs]


def resolve_backend(backend: str = "auto") -> str:
    """Resolve "auto": "langdetect_rs" when it imports and answers exactly as langdetect does on
    `LANGUAGE_PROBES` (seeds 0 and 1: same languages, bit-identical probabilities; checked once per
    installed pair of versions, the verdict kept in `llmforge.prep.cache`), else "langdetect". Other names are
    checked and returned as they are."""
    global _AUTO_BACKEND
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"unknown language backend {backend!r}; choose one of {BACKENDS}")
        return backend
    if _AUTO_BACKEND is None:
        _AUTO_BACKEND = _choose_backend()
    return _AUTO_BACKEND


def _choose_backend() -> str:
    try:
        _factory("langdetect_rs")
    except ImportError:
        return "langdetect"
    try:
        versions = [metadata.version(name) for name in ("langdetect", "langdetect-rs")]
    except metadata.PackageNotFoundError:
        log.warning("langdetect is not installed: using langdetect_rs without checking it against langdetect")
        return "langdetect_rs"
    # The verdict depends only on the two installed versions and the probes: remember it on disk, so a
    # worker process does not spend ~0.5 s loading pure-Python langdetect to check it again.
    key = hashlib.sha256(json.dumps([versions, LANGUAGE_PROBES]).encode()).hexdigest()[:16]
    name = f"language-backend-{key}.json"
    try:
        return json.loads(cache.load(name) or b"")["backend"]
    except (ValueError, KeyError, TypeError):
        pass
    backend = "langdetect_rs"
    for seed in (0, 1):
        for text in LANGUAGE_PROBES:
            if detect_language(text, seed, "langdetect_rs") != detect_language(text, seed, "langdetect"):
                log.warning("langdetect_rs differs from langdetect on %r: using langdetect", text[:40])
                backend = "langdetect"
                break
        if backend == "langdetect":
            break
    cache.store(name, json.dumps({"backend": backend, "versions": versions}).encode())
    return backend


class LanguageFilter(Filter):
    """Detect the language (langdetect, seeded) and keep documents in ``languages``.

    Stores ``metadata["language"]`` (best language, or "unknown") and ``metadata["language_score"]`` (its
    probability, 0.0 when unknown) on every document it sees, kept or not.

    Args:
        languages: ISO 639-1 codes as langdetect names them ("en", "de", "zh-cn", ...). None: annotate only,
            keep every document.
        threshold: minimum probability of the best language (default 0.65, FineWeb's language score; see
            the module docstring).
        seed: langdetect's random seed (default 0, as in the code that built C4).
        backend: "langdetect" (pure Python), "langdetect_rs" (Rust port, same answers bit for bit, ~35x
            faster here, see experiments/bench_langdetect.py) or "auto" (langdetect_rs if installed and
            verified equal on this machine, see `resolve_backend`).

    Reasons: ``language:<code>`` (best language not wanted), ``language_low_confidence`` (wanted but below
    the threshold), ``language_no_features`` (nothing to detect: empty, digits, symbols).
    """

    name = "language"

    def __init__(
        self,
        languages: Sequence[str] | None = ("en",),
        threshold: float = 0.65,
        seed: int = 0,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"unknown language backend {backend!r}; choose one of {BACKENDS}")
        if isinstance(languages, str):
            languages = [languages]
        self.languages = None if languages is None else frozenset(languages)
        self.threshold = threshold
        self.seed = seed
        self.backend = backend

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        result = detect_language(doc.text, self.seed, self.backend)
        if not result:  # None: no features; []: no language above langdetect's 0.1 floor
            doc.metadata["language"] = UNKNOWN_LANGUAGE
            doc.metadata["language_score"] = 0.0
            return (
                self.languages is None,
                "language_no_features" if result is None else "language_low_confidence",
            )
        lang, prob = result[0]
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = prob
        if self.languages is None:
            return True, None
        if lang not in self.languages:
            return False, f"language:{lang}"
        if prob < self.threshold:
            return False, "language_low_confidence"
        return True, None


# ----------------------------------------------------------------------------------------------------------
# 6. C4 line rules

C4_END_MARKS = (".", "?", "!", '"')  # tensorflow_datasets c4_utils._END_MARKS
C4_POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# A sentence ends at a run of . ! ? (maybe followed by closing quotes/brackets) before a space or the end.
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")


class C4LineFilter(PipelineStep):
    """C4's page cleaning (Raffel et al. 2020, sec. 2.2; tensorflow_datasets ``c4_utils.clean_page``).

    Edits the text: keeps only lines that pass the line rules, and drops the page on the page rules.
    Off by default in `build_filters` (it is English-centric and removes much of a page's structure).

    Line rules, in order (a line failing one is removed and counted in ``line_stats`` under its name;
    ``line_stats`` is the step's ``stats.counters``, so the counts reach stats.json and the funnel report):
    ``too_long_word`` (a word over ``max_word_length``=1000 chars), then Wikipedia-style citations
    ("[1]", "[edit]", "[citation needed]") are cut from the line if ``remove_citations``, then
    ``no_terminal_punct`` (not ending in one of ``end_marks``, or ending in "..."), ``too_few_words``
    (< ``min_words_per_line``=5), ``javascript`` (mentions "javascript"), ``policy`` (terms of use,
    privacy/cookie notices).

    Page rules (reasons): ``c4_lorem_ipsum`` (a kept line contains "lorem ipsum"), ``c4_curly_bracket`` (a
    kept line contains "{"), ``c4_too_few_sentences`` (fewer than ``min_sentences``=3 sentences left;
    sentences are counted by end marks per kept line, at least one per line — C4 used NLTK's punkt).
    Any rule is off with ``None``/``False``.
    """

    name = "c4"

    def __init__(
        self,
        min_words_per_line: int | None = 5,
        min_sentences: int | None = 3,
        max_word_length: int | None = 1000,
        end_marks: Sequence[str] | None = C4_END_MARKS,
        remove_citations: bool = True,
        filter_javascript: bool = True,
        filter_lorem_ipsum: bool = True,
        filter_curly_bracket: bool = True,
        filter_policy: bool = True,
        policy_substrings: Sequence[str] = C4_POLICY_SUBSTRINGS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.min_words_per_line = min_words_per_line
        self.min_sentences = min_sentences
        self.max_word_length = max_word_length
        self.end_marks = None if not end_marks else tuple(end_marks)
        self.remove_citations = remove_citations
        self.filter_javascript = filter_javascript
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_curly_bracket = filter_curly_bracket
        self.filter_policy = filter_policy
        self.policy_substrings = tuple(policy_substrings)

    @property
    def line_stats(self) -> Counter:
        return self.stats.counters

    def clean_lines(self, text: str) -> tuple[str | None, str | None]:
        """(new text, None), or (None, page reason) when the page is dropped. Counts lines in line_stats."""
        kept: list[str] = []
        sentences = 0
        stats = self.line_stats
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue  # blank lines are layout, not lines (C4's WET input had none)
            stats["lines_in"] += 1
            words = line.split()
            if self.max_word_length is not None and any(len(w) > self.max_word_length for w in words):
                stats["too_long_word"] += 1
                continue
            if self.remove_citations and "[" in line:
                line = " ".join(_CITATION.sub(" ", line).split())
            if self.end_marks and (not line.endswith(self.end_marks) or line.endswith("...")):
                stats["no_terminal_punct"] += 1
                continue
            if self.min_words_per_line is not None and len(line.split()) < self.min_words_per_line:
                stats["too_few_words"] += 1
                continue
            lower = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lower:
                return None, "c4_lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                stats["javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return None, "c4_curly_bracket"
            if self.filter_policy and any(p in lower for p in self.policy_substrings):
                stats["policy"] += 1
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
            stats["lines_kept"] += 1
        if self.min_sentences is not None and sentences < self.min_sentences:
            return None, "c4_too_few_sentences"
        return "\n".join(kept), None

    def process(self, doc: Document) -> Document | None:
        text, reason = self.clean_lines(doc.text)
        if text is None:
            self.drop(doc, reason or self.name)
            return None
        return doc if text == doc.text else replace(doc, text=text)


# ----------------------------------------------------------------------------------------------------------
# build from config

FILTERS: dict[str, type[PipelineStep]] = {
    "word_count": WordCountFilter,
    "alnum": AlphanumericFilter,
    "language": LanguageFilter,
    "gopher_quality": GopherQualityFilter,
    "repetition": RepetitionFilter,
    "c4": C4LineFilter,
    "decontaminate": DecontaminateFilter,  # llmforge/prep/decontaminate.py; last: counts what would be kept
}
# cheapest first; language before the Gopher rules, which then know each document's language (stop words)
FILTER_ORDER = tuple(FILTERS)
ENABLED_BY_DEFAULT = {key: key not in ("c4", "decontaminate") for key in FILTER_ORDER}


def _plain(value: Any) -> Any:
    """Mappings -> dict and non-string sequences -> list, recursively (OmegaConf's DictConfig and ListConfig
    are a MutableMapping and a MutableSequence, so a Hydra config section works as well as a dict)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def build_filters(
    cfg: Mapping[str, Any] | None = None, order: Sequence[str] = FILTER_ORDER
) -> list[PipelineStep]:
    """Filter steps from a plain dict, in ``order`` (default `FILTER_ORDER`, cheapest first), whatever the
    dict's order. ``order`` must name every filter once.

    ``cfg`` maps a filter key to its constructor arguments plus ``enabled``; a missing key means that
    filter with its defaults, enabled or not as in `ENABLED_BY_DEFAULT` (all but ``c4``). Example::

        build_filters({"word_count": {"min_words": 100}, "language": {"languages": ["de"]},
                       "c4": {"enabled": True}})

    Unknown keys raise (a typo must not silently disable nothing). When the language filter is enabled
    with target languages none of which is in the Gopher filter's ``stop_words_languages``, and
    ``min_stop_words`` is not set explicitly, the (English) stop-word rule is turned off.
    """
    cfg = _plain(cfg or {})
    unknown = set(cfg) - set(FILTERS)
    if unknown:
        raise ValueError(f"unknown filter(s) {sorted(unknown)}; known: {list(FILTER_ORDER)}")
    if sorted(order) != sorted(FILTER_ORDER):
        raise ValueError(f"order must name each of {list(FILTER_ORDER)} once, got {list(order)}")
    kwargs: dict[str, dict] = {}
    for key in order:
        section = dict(cfg.get(key) or {})
        if section.pop("enabled", ENABLED_BY_DEFAULT[key]):
            kwargs[key] = section
    if "language" in kwargs and "gopher_quality" in kwargs:
        gopher = kwargs["gopher_quality"]
        targets = kwargs["language"].get("languages", ["en"])
        stop_langs = gopher.get("stop_words_languages", ["en"])
        if targets is not None and stop_langs is not None and "min_stop_words" not in gopher:
            if isinstance(targets, str):
                targets = [targets]
            if not set(targets) & set(stop_langs):
                gopher["min_stop_words"] = None
    return [FILTERS[key](**args) for key, args in kwargs.items()]
