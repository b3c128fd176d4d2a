"""Run lm-evaluation-harness tasks on an llmforge model and flatten the scores.

The task list may mix lm-eval's own tasks (``hellaswag``, ``lambada_openai``: these download their data
from the Hugging Face hub the first time) and local ones: the tasks shipped in ``llmforge/downstream/tasks``
(``llmforge_stdlib``, offline) are always on the search path, and ``include_path`` adds directories of
task YAMLs (for example a task whose ``dataset_path: json`` reads local ``data_files``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmforge.downstream import TASKS_DIR


def task_manager(
    include_path: str | Path | Sequence[str | Path] | None = None, tasks: Sequence[str] | None = None
) -> Any:
    """lm-eval's task index over llmforge's shipped tasks, ``include_path`` and (unless every one of ``tasks``
    is found in those) lm-eval's own ~14k task files, whose indexing costs seconds: kept per process."""
    paths = [str(TASKS_DIR)]
    if include_path:
        extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        paths += [str(p) for p in extra]
    local = _task_manager(tuple(paths), False)
    if tasks is not None and set(tasks) <= set(local.all_tasks):
        return local
    return _task_manager(tuple(paths), True)


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's results dictionary for ``tasks`` on ``lm`` (an `LlmforgeLM`). The global random generators
    are left as they were (lm-eval seeds Python's, NumPy's and torch's own otherwise)."""
    from lm_eval.evaluator import simple_evaluate

    if not tasks:
        raise ValueError("no task given")
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        num_fewshot=num_fewshot,
        task_manager=task_manager(include_path, tasks),
        log_samples=log_samples,
        bootstrap_iters=0,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        fewshot_random_seed=1234,
    )
    if results is None:  # only on ranks other than lm-eval's rank 0
        return {}
    return dict(results)


def scores(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from lm-eval's results (``acc,none`` -> ``acc``; stderr left out)."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            skip = metric in ("alias", "sample_len") or metric.endswith("_stderr")
            if skip or not isinstance(value, (int, float)):
                continue
            out[f"{task}/{metric}"] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = {
        k: results[k] for k in ("results", "versions", "n-shot", "higher_is_better", "config") if k in results
    }
    path.write_text(json.dumps(keep, indent=2, default=str) + "\n")
    return path


def evaluate_checkpoint(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    out: str | Path | None = None,
) -> int:
    """``python -m llmforge.evaluate CKPT tasks=...``: print lm-eval's table, write its JSON, warn about tasks
    the training data was not decontaminated against. Returns the exit status."""
    import sys

    from llmforge.downstream.adapter import LlmforgeLM

    try:
        lm = LlmforgeLM(checkpoint=str(checkpoint), device=device, batch_size=batch_size)
        for line in contamination_warnings(lm.lm.hparams, checkpoint, tasks):
            print(f"warning: {line}", file=sys.stderr)
        results = run_tasks(lm, tasks, limit=limit, num_fewshot=num_fewshot, include_path=include_path)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(results))
    if out is None:
        file, run_dir = files_of(checkpoint)
        out = run_dir / "eval" / f"{file.stem}-lm_eval.json"
    print(f"-> {write_json(results, Path(out))}")
    return 0


def files_of(checkpoint: str | Path) -> tuple[Path, Path]:
    """The checkpoint file (or exported directory) and the run directory it belongs to."""
    from llmforge.checkpoints import checkpoint_file

    path = Path(checkpoint)
    file = path if path.is_dir() and (path / "config.json").is_file() else checkpoint_file(path)
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else file.parent
    return file, run_dir


def decontaminated_tasks(hparams: dict, checkpoint: str | Path) -> list[str] | None:
    """The tasks the checkpoint's training data was decontaminated against: the run manifest's
    ``data.decontaminated_against``, else the data manifest's (None: neither is found)."""
    from llmforge.prep.decontaminate import read_tasks

    manifest = files_of(checkpoint)[1] / "run_manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("data", {}).get("decontaminated_against")
        if recorded is not None:
            return list(recorded)
    data = (hparams.get("data") or {}).get("path")
    if not data:
        return None
    candidates = [Path(data)] + [p / data for p in Path(checkpoint).resolve().parents[:4]]
    return next((t for t in (read_tasks(c) for c in candidates) if t is not None), None)


def contamination_warnings(hparams: dict, checkpoint: str | Path, tasks: Sequence[str]) -> list[str]:
    """One line per task the checkpoint's training data was not decontaminated against (no line when
    neither the run manifest nor the data manifest is found)."""
    done = decontaminated_tasks(hparams, checkpoint)
    if done is None:
        return []
    data = (hparams.get("data") or {}).get("path")
    return [
        f"{task}: the training data ({data}) was not decontaminated against it "
        "(python -m llmforge.prepare filters.decontaminate.tasks=[...])"
        for task in tasks
        if task not in done
    ]
