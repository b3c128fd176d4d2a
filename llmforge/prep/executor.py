"""Where data-stage tasks run: local worker processes, or SLURM array jobs through submitit.

An executor only maps a picklable function over argument tuples and returns the results in order; the
tasks themselves are idempotent (they skip work whose completion marker matches), so a rerun after a crash
or a preemption redoes only what is missing, whichever executor runs it.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


class LocalExecutor:
    """`workers` processes (spawned, so no state leaks from the driver); 1 runs in-process."""

    def __init__(self, workers: int = 1, progress: bool = True) -> None:
        self.workers = max(1, workers)
        self.progress = progress

    def map(self, fn: Callable[..., Any], args: Sequence[tuple], label: str = "") -> list[Any]:
        results: list[Any] = [None] * len(args)
        with _progress(self.progress) as bar:
            task = bar.add_task(label, total=len(args))
            if self.workers == 1 or len(args) <= 1:
                for i, a in enumerate(args):
                    results[i] = fn(*a)
                    bar.advance(task)
                return results
            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(min(self.workers, len(args)), mp_context=ctx) as pool:
                futures = {pool.submit(fn, *a): i for i, a in enumerate(args)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.advance(task)
        return results

    def run(self, fn: Callable[..., Any], *args: Any, label: str = "") -> Any:
        return self.map(fn, [args], label)[0]


class SlurmExecutor:
    """Each `map` is one SLURM job array (one task per item); `run` is a single job. Blocks until done."""

    def __init__(self, folder: str | Path, progress: bool = True, **slurm: Any) -> None:
        import submitit

        self.progress = progress
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = {k: v for k, v in slurm.items() if v is not None}
        self.executor.update_parameters(**params)

    def map(self, fn: Callable[..., Any], args: Sequence[tuple], label: str = "") -> list[Any]:
        if not args:
            return []
        jobs = self.executor.map_array(fn, *zip(*args, strict=True))
        with _progress(self.progress) as bar:
            task = bar.add_task(f"{label} (slurm array {jobs[0].job_id.split('_')[0]})", total=len(jobs))
            results = []
            for job in jobs:
                results.append(job.result())  # raises with the task's traceback if it failed
                bar.advance(task)
        return results

    def run(self, fn: Callable[..., Any], *args: Any, label: str = "") -> Any:
        return self.map(fn, [args], label)[0]


def make_executor(cfg: dict, work_dir: Path, progress: bool = True) -> LocalExecutor | SlurmExecutor:
    name = cfg.get("name", "local")
    if name == "local":
        return LocalExecutor(int(cfg.get("workers", 1)), progress)
    if name == "slurm":
        return SlurmExecutor(work_dir / "slurm", progress, **dict(cfg.get("slurm") or {}))
    raise ValueError(f"executor.name={name!r} is not one of local, slurm")
