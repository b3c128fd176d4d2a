"""The shipped offline task ``llmforge_stdlib``: which standard-library module defines a function.

Every machine has Python's standard library, and the demo crawl is made of its documentation, so a model
trained on the demo has seen each module's page listing its functions. An item asks for the module of one
function, with four choices (the right module and three others that have no attribute of that name, drawn as
often as each module is a right answer, so knowing only which module names are common gives chance)::

    The function dumps() is defined in the Python module   ->  json | shlex | glob | ftplib

Chance is 25%. ``python -m llmforge.downstream.stdlib_task`` rewrites ``tasks/llmforge_stdlib.jsonl`` from
the running Python (seeded; the file in the repository was made with Python 3.11). The task reads that
file through ``tasks/llmforge_stdlib.yaml`` (``custom_dataset``), with no download.
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


def module_functions(max_modules: int | None = None) -> dict[str, list[str]]:
    """Public functions defined in each importable standard-library module (as the demo renders them)."""
    from llmforge.prep.demo_warc import stdlib_modules

    out: dict[str, list[str]] = {}
    for name in stdlib_modules(max_modules):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                module = __import__(name)
        except Exception:  # noqa: BLE001 — a module that does not import is not in the demo either
            continue
        names = sorted(
            attr
            for attr, obj in vars(module).items()
            if not attr.startswith("_")
            and (inspect.isfunction(obj) or inspect.isbuiltin(obj))
            and getattr(obj, "__module__", None) == name
        )
        if names:
            out[name] = names
    return out


def make_items(functions: dict[str, list[str]], n: int = 300, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    modules = sorted(functions)
    owners: dict[str, set[str]] = {}
    for module, names in functions.items():
        for fn in names:
            owners.setdefault(fn, set()).add(module)
    pairs = [(m, fn) for m in modules for fn in functions[m] if len(owners[fn]) == 1]
    rng.shuffle(pairs)
    # distractors come from the answers' own distribution (a module as often as it owns a function), so a
    # model that only knows which module names are common scores chance
    weights = [sum(len(owners[fn]) == 1 for fn in functions[m]) for m in modules]
    items = []
    for module, fn in pairs[:n]:
        others: list[str] = []
        while len(others) < 3:
            pick = rng.choices(modules, weights)[0]
            if pick != module and pick not in others:
                others.append(pick)
        choices = [module, *others]
        rng.shuffle(choices)
        items.append(
            {
                "question": f"The function {fn}() is defined in the Python module",
                "choices": choices,
                "answer": choices.index(module),
            }
        )
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
    items = make_items(module_functions(), args.n, args.seed)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"{len(items)} items -> {args.out}")


if __name__ == "__main__":
    main()
