"""Decontamination against the evaluation suite: drop documents that share an n-gram with a task's items.

``filters.decontaminate`` (off by default) names lm-eval tasks, the same list a training run evaluates
(``callbacks.downstream.tasks``, ``python -m llmforge.evaluate CKPT tasks=...``). Before the per-shard
stage, the driver builds an index of the word n-grams of every item of those tasks (`build_index`: the
question and every answer choice, alone and joined, as lm-eval and GPT-3 looked for 13-gram overlaps) in
``work/decontaminate/index.npz``; each worker's `DecontaminateFilter` then drops a document that contains
one of them, with the reason ``decontaminate:<task>`` (counted per task in the funnel; a sample is kept
under ``dropped/``). The dataset's manifest lists the tasks (``source.decontaminated_against``), the run
manifest carries it, and ``python -m llmforge.evaluate`` warns when it scores another task.

Words: lower-cased, punctuation removed, split on whitespace. An item shorter than ``ngram`` words is
matched as a whole (down to ``min_words`` words; shorter items are too generic to attribute). Hashes are
64-bit (blake2b per word, a polynomial over the window), so the index is small and the check is a sorted
search per document.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmforge.prep.document import Document
from llmforge.prep.step import Filter

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_MULT = np.uint64(0x100000001B3)  # FNV-1a prime: the window hash is sum(word_hash * MULT^(n-1-j))
_WORD_CACHE_MAX = 1 << 20


def words(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


class _WordHasher:
    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, ws: Sequence[str]) -> np.ndarray:
        cache = self.cache
        if len(cache) > _WORD_CACHE_MAX:
            cache.clear()
        out = np.empty(len(ws), dtype=np.uint64)
        for i, w in enumerate(ws):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def window_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """The hash of every window of ``n`` consecutive words (uint64, wrapping arithmetic)."""
    if len(word_hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    powers = np.array([pow(int(_MULT), n - 1 - j, 1 << 64) for j in range(n)], dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(word_hashes, n)
    with np.errstate(over="ignore"):
        return (windows * powers).sum(axis=1, dtype=np.uint64)


class _Powers:
    """``MULT**k`` and ``MULT**-k`` (mod 2**64; the prime is odd, so it has an inverse) for k < length."""

    def __init__(self) -> None:
        self.up = np.ones(1, dtype=np.uint64)
        self.down = np.ones(1, dtype=np.uint64)

    def __call__(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < length:
            size = max(length, 2 * len(self.up))
            with np.errstate(over="ignore"):
                self.up = np.multiply.accumulate(
                    np.r_[np.uint64(1), np.full(size - 1, _MULT)], dtype=np.uint64
                )
                inverse = np.uint64(pow(int(_MULT), -1, 1 << 64))
                self.down = np.multiply.accumulate(
                    np.r_[np.uint64(1), np.full(size - 1, inverse)], dtype=np.uint64
                )
        return self.up[:length], self.down[:length]


def all_window_hashes(
    word_hashes: np.ndarray, sizes: Iterable[int], powers: _Powers
) -> dict[int, np.ndarray]:
    """`window_hashes` for several window sizes from one prefix sum: the window of ``n`` words at ``i`` is
    ``MULT**(i+n-1) * (P[i+n] - P[i])`` with ``P[k] = sum(word_hash[j] * MULT**-j, j < k)`` (mod 2**64), so
    each size costs O(words) rather than O(n * words). Equal to `window_hashes` bit for bit."""
    length = len(word_hashes)
    up, down = powers(length)
    with np.errstate(over="ignore"):
        prefix = np.r_[np.uint64(0), np.cumsum(word_hashes * down, dtype=np.uint64)]
        return {
            n: up[n - 1 :] * (prefix[n:] - prefix[:-n]) if length >= n else np.zeros(0, dtype=np.uint64)
            for n in sizes
        }


def item_texts(task: Any, doc: Any) -> list[str]:
    """The texts of one task item: the prompt, each choice or target, and the prompt joined to each."""

    def text(x: Any) -> str | None:
        return x if isinstance(x, str) and x.strip() else None

    prompt = text(task.doc_to_text(doc))
    answers: list[str] = []
    if getattr(task, "OUTPUT_TYPE", None) == "multiple_choice":
        answers = [c for c in task.doc_to_choice(doc) if text(c)]
    else:
        target = task.doc_to_target(doc)
        answers = [t for t in (target if isinstance(target, list) else [target]) if text(t)]
    out = [prompt] if prompt else []
    out += answers
    if prompt:
        out += [f"{prompt} {a}" for a in answers]
    return out


def leaf_tasks(task_dict: dict) -> Iterable[tuple[str, Any]]:
    for name, value in task_dict.items():
        if isinstance(value, dict):
            yield from leaf_tasks(value)
        else:
            yield getattr(name, "group_name", name) if not isinstance(name, str) else name, value


def build_index(
    tasks: Sequence[str], include_path: Sequence[str] | str | None = None, ngram: int = 13, min_words: int = 8
) -> dict[str, np.ndarray]:
    """``{"hashes", "task", "sizes", "names"}``: sorted window hashes with the task each came from."""
    from lm_eval.tasks import get_task_dict

    from llmforge.downstream.harness import task_manager

    hasher = _WordHasher()
    names: list[str] = []
    rows: dict[int, list[tuple[np.ndarray, int]]] = {}
    for name, task in leaf_tasks(get_task_dict(list(tasks), task_manager(include_path, tasks))):
        names.append(str(name))
        t = len(names) - 1
        for doc in task.eval_docs:
            for text in item_texts(task, doc):
                ws = words(text)
                if len(ws) < min_words:
                    continue
                n = min(ngram, len(ws))
                rows.setdefault(n, []).append((window_hashes(hasher(ws), n), t))
    hashes, owner, sizes = [], [], []
    for n, items in sorted(rows.items()):
        h = np.concatenate([a for a, _ in items])
        o = np.concatenate([np.full(len(a), t, dtype=np.int32) for a, t in items])
        order = np.argsort(h, kind="stable")
        hashes.append(h[order])
        owner.append(o[order])
        sizes.append(np.full(len(h), n, dtype=np.int32))
    empty = np.zeros(0, dtype=np.uint64)
    return {
        "hashes": np.concatenate(hashes) if hashes else empty,
        "task": np.concatenate(owner) if owner else np.zeros(0, dtype=np.int32),
        "sizes": np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int32),
        "names": np.array(names),
    }


def prepare_index(cfg: dict, work: Path) -> dict:
    """Build the index of ``filters.decontaminate`` into the work directory and return the config with the
    filter pointed at it (its sha256 joins the config, so changed task data redoes the per-shard stage)."""
    section = dict((cfg.get("filters") or {}).get("decontaminate") or {})
    if not section.get("enabled", False):
        return cfg
    tasks = list(section.get("tasks") or [])
    if not tasks:
        raise ValueError(
            "filters.decontaminate.tasks is empty: name the lm-eval tasks to decontaminate against"
        )
    index = build_index(
        tasks, section.get("include_path"), int(section.get("ngram", 13)), int(section.get("min_words", 8))
    )
    path = work / "decontaminate" / "index.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("index.tmp.npz")
    np.savez(tmp, **index)
    tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    section.update(index=str(path), index_sha256=digest)
    filters = {**dict(cfg.get("filters") or {}), "decontaminate": section}
    return {**cfg, "filters": filters}


class DecontaminateFilter(Filter):
    """Drops a document holding an n-gram of an eval task's items (reason ``decontaminate:<task>``)."""

    name = "decontaminate"

    def __init__(
        self,
        tasks: Sequence[str] = (),
        index: str | None = None,
        ngram: int = 13,
        min_words: int = 8,
        include_path: Any = None,
        index_sha256: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if index is None:
            raise ValueError(
                "filters.decontaminate needs its index: run it through python -m llmforge.prepare"
            )
        with np.load(index) as data:
            self.hashes = data["hashes"]
            self.task = data["task"]
            self.sizes = data["sizes"]
            self.names = [str(x) for x in data["names"]]
        self.by_size = {
            int(n): (self.hashes[self.sizes == n], self.task[self.sizes == n]) for n in np.unique(self.sizes)
        }
        self.hasher = _WordHasher()
        self.powers = _Powers()

    def filter(self, doc: Document) -> tuple[bool, str | None]:
        if not self.by_size:
            return True, None
        wh = self.hasher(words(doc.text))
        windows = all_window_hashes(wh, self.by_size, self.powers)
        for n, (hashes, owner) in self.by_size.items():
            h = windows[n]
            if not len(h):
                continue
            pos = np.searchsorted(hashes, h).clip(max=len(hashes) - 1)
            hit = np.flatnonzero(hashes[pos] == h)
            if len(hit):
                return False, f"decontaminate:{self.names[int(owner[pos[hit[0]]])]}"
        return True, None


def tasks_of_manifest(manifest: dict) -> list[str]:
    return list((manifest.get("source") or {}).get("decontaminated_against") or [])


def read_tasks(data_dir: str | Path) -> list[str] | None:
    """The tasks a prepared dataset was decontaminated against (None: no manifest there)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    return tasks_of_manifest(json.loads(path.read_text()))
