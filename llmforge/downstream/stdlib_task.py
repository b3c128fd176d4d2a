"""The shipped offline task ``llmforge_stdlib``: which of four word orders is how the library writes it.

Every machine has Python's standard library, and the demo crawl is made of its documentation: each module's
page lists its functions as a name followed by the first line of its docstring. An item gives a function's
name, as the page writes it, and four versions of its description: the real one and three copies with two
neighbouring words swapped (a test of learnt word order, in the style of BLiMP's minimal pairs)::

    globals()  ->  Return the dictionary containing the current scope's global variables.
                 | Return the dictionary containing current the scope's global variables. | ...

Chance is 25%; the four choices hold the same bytes, so ``acc`` and ``acc_norm`` agree. A model trained on
the demo has read these lines, so the task measures what the run learnt from its own data (decontaminating
against it removes those pages: ``filters.decontaminate``). ``python -m llmforge.downstream.stdlib_task``
rewrites ``tasks/llmforge_stdlib.jsonl`` from the running Python (seeded; the file in the repository was
made with Python 3.11). The task reads that file through ``tasks/llmforge_stdlib.yaml``
(``custom_dataset``), with no download.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import random
import warnings
from pathlib import Path

from llmforge.downstream import TASKS_DIR

ITEMS = TASKS_DIR / "llmforge_stdlib.jsonl"


def function_descriptions(max_modules: int | None = None) -> dict[str, str]:
    """``name() -> first docstring line`` of the public functions of each importable standard-library
    module, as the demo's pages render them (names defined in several modules are left out)."""
    from llmforge.prep.demo_warc import stdlib_modules

    seen: dict[str, list[str]] = {}
    for name in stdlib_modules(max_modules):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = __import__(name)
        except Exception:  # noqa: BLE001 — a module that does not import is not in the demo either
            continue
        for attr, obj in vars(module).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            first = (inspect.getdoc(obj) or "").strip().split("\n")[0].strip()
            if len(first.split()) >= 3:
                seen.setdefault(f"{attr}()", []).append(first)
    return {fn: lines[0] for fn, lines in sorted(seen.items()) if len(lines) == 1}


def make_items(descriptions: dict[str, str], n: int = 300, seed: int = 0) -> list[dict]:
    """``n`` items: a function's name, its description as written and three copies with two neighbouring
    words swapped (descriptions of at least six words, each used once)."""
    rng = random.Random(seed)
    usable = sorted({line: fn for fn, line in descriptions.items() if len(line.split()) >= 6}.items())
    rng.shuffle(usable)
    items = []
    for line, fn in usable:
        if len(items) == n:
            break
        words = line.split()
        choices = [line]
        for i in rng.sample(range(len(words) - 1), len(words) - 1):  # swap two neighbouring words
            swapped = " ".join(words[:i] + [words[i + 1], words[i]] + words[i + 2 :])
            if swapped not in choices:
                choices.append(swapped)
            if len(choices) == 4:
                break
        if len(choices) < 4:
            continue
        rng.shuffle(choices)
        items.append({"question": fn, "choices": choices, "answer": choices.index(line)})
    return items


def load_dataset(**_: object) -> dict:
    """lm-eval's ``custom_dataset`` hook: the shipped items as a ``test`` split."""
    import datasets

    rows = [json.loads(line) for line in ITEMS.read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ITEMS)
    args = parser.parse_args(argv)
    items = make_items(function_descriptions(), args.n, args.seed)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{len(items)} items -> {args.out}")


if __name__ == "__main__":
    main()
