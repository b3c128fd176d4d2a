"""Where data-stage tasks run: local worker processes, SLURM array jobs (submitit) or Ray tasks.

An executor maps a picklable function over argument tuples and returns the results in order. The tasks are
idempotent (they skip work whose completion marker matches), so a rerun after a crash, a preemption or a
failed task redoes only what is missing, whichever executor runs it. Before anything is submitted, the
driver asks each task's `cached` check (the same marker test, cheap) and runs only the tasks not yet done: a
rerun of a finished dataset starts no worker at all.

Every task runs inside `llmforge.prep.task.run_task`: its own log and stats file under ``logs/<stage>/``.
A stage whose tasks fail still runs its other tasks to the end, then raises `TaskFailed` naming each failed
task, its error and its log. The driver shows per stage: tasks done, documents and documents/s (from the
finished tasks' results), elapsed time and an ETA.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from llmforge.prep.task import TaskFailed, run_task, task_paths

Outcome = tuple[int, Any]  # (index into the stage's argument list, result or the exception it raised)


class RateColumn(ProgressColumn):
    """``12,345 docs 1,234/s``: a stage row counts the documents of its finished tasks (field `docs`); a row
    of progress inside a task counts its own unit."""

    def render(self, task: Task) -> Text:
        count = task.fields.get("docs", task.completed)
        if count is None:  # a stage whose results count nothing
            return Text("")
        unit = task.fields.get("unit", "docs")
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = f" {count / elapsed:,.0f}/s" if elapsed and count else ""
        return Text(f"{count:,.0f} {unit}{rate}", style="progress.data.speed")


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


class Executor:
    """The driver's side, shared by every executor: skip finished tasks, show progress, gather failures."""

    def __init__(self, progress: bool = True, log_dir: str | Path | None = None) -> None:
        self.progress = progress
        self.log_dir = str(log_dir) if log_dir is not None else None

    def map(
        self,
        fn: Callable[..., Any],
        args: Sequence[tuple],
        label: str = "",
        *,
        cached: Callable[..., Any] | None = None,
        count: Callable[[Any], int] | None = None,
    ) -> list[Any]:
        """`[fn(*a) for a in args]`, run where this executor runs tasks. `cached(*a)` returns a finished
        task's result or None; `count(result)` is the number of documents a task handled (for docs/s)."""
        results: list[Any] = [cached(*a) if cached else None for a in args]
        todo = [(i, a) for i, a in enumerate(args) if results[i] is None]
        failed: list[tuple[int, BaseException]] = []
        with progress_bar(self.progress) as bar:
            docs = 0 if count else None
            skipped = len(args) - len(todo)
            row = bar.add_task(label, total=len(args), completed=skipped, docs=docs, unit="docs")
            for i, outcome in self._run(fn, todo, label, bar):
                if isinstance(outcome, BaseException):
                    failed.append((i, outcome))
                else:
                    results[i] = outcome
                    if count:
                        docs += count(outcome)
                    bar.update(row, advance=1, docs=docs)
        if failed:
            raise TaskFailed(self.failure_report(label, failed, len(args)))
        return results

    def run(
        self, fn: Callable[..., Any], *args: Any, label: str = "", cached: Callable[..., Any] | None = None
    ) -> Any:
        return self.map(fn, [args], label, cached=cached)[0]

    def _run(self, fn: Callable[..., Any], todo: list[tuple[int, tuple]], label: str, bar: Progress
             ) -> Iterator[Outcome]:
        raise NotImplementedError  # abstract: yields (index, result or exception) as tasks finish

    def failure_report(self, label: str, failed: list[tuple[int, BaseException]], total: int) -> str:
        lines = [f"{len(failed)} of {total} {label} tasks failed; rerun the same command to redo only them:"]
        for i, err in sorted(failed, key=lambda f: f[0])[:20]:
            where = f" (log: {task_paths(self.log_dir, label, task_name(i))[0]})" if self.log_dir else ""
            last = (str(err).strip().splitlines() or [""])[-1]  # a remote traceback ends with the error
            lines.append(f"  {label}/{task_name(i)}: {type(err).__name__}: {last}{where}")
        if len(failed) > 20:
            more = f"grep -l '\"failed\"' {self.log_dir}/{label}/*.json"
            lines.append(f"  ... and {len(failed) - 20} more: {more}")
        return "\n".join(lines)


def task_name(index: int) -> str:
    return f"{index:05d}"


class LocalExecutor(Executor):
    """`workers` processes; one task, or 1 worker, runs in-process, where progress inside the task shows
    live. Workers are forked from a fork server (a clean process started once per run, which imports the
    task's module and the driver's main module once), so no state leaks from the driver and a worker
    starts in milliseconds, not in the ~0.5 s a spawned interpreter takes to import numpy, Hydra and the
    pipeline again."""

    def __init__(self, workers: int = 1, progress: bool = True, log_dir: str | Path | None = None) -> None:
        super().__init__(progress, log_dir)
        self.workers = max(1, workers)

    def _run(self, fn, todo, label, bar) -> Iterator[Outcome]:
        if self.workers == 1 or len(todo) <= 1:
            live = bar if self.progress else None
            for i, a in todo:
                try:
                    yield i, run_task(fn, a, label, task_name(i), self.log_dir, live)
                except Exception as err:  # noqa: BLE001 — reported with the other failures of the stage
                    yield i, err
            return
        ctx = mp.get_context("forkserver")
        # a worker runs the driver's main module again (as __mp_main__): its imports come preloaded too
        main = getattr(sys.modules["__main__"].__spec__, "name", None)
        ctx.set_forkserver_preload([m for m in ("llmforge.prep.task", fn.__module__, main) if m])
        with ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(run_task, fn, a, label, task_name(i), self.log_dir): i for i, a in todo}
            for fut in as_completed(futures):
                err = fut.exception()
                yield futures[fut], err if err is not None else fut.result()


class SlurmExecutor(Executor):
    """Each `map` is one SLURM job array (one task per item); `run` is a single job. Blocks until done."""

    def __init__(
        self, folder: str | Path, progress: bool = True, log_dir: str | Path | None = None, **slurm: Any
    ) -> None:
        import submitit

        super().__init__(progress, log_dir)
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = {k: v for k, v in slurm.items() if v is not None}
        self.executor.update_parameters(**params)

    def _run(self, fn, todo, label, bar) -> Iterator[Outcome]:
        if not todo:
            return
        jobs = self.executor.map_array(
            run_task,
            [fn] * len(todo),
            [a for _, a in todo],
            [label] * len(todo),
            [task_name(i) for i, _ in todo],
            [self.log_dir] * len(todo),
        )
        bar.console.log(f"{label}: slurm array {jobs[0].job_id.split('_')[0]}")
        for (i, _), job in zip(todo, jobs, strict=True):
            try:
                yield i, job.result()  # raises with the task's traceback if it failed
            except Exception as err:  # noqa: BLE001 — reported with the other failures of the stage
                yield i, err


class RayExecutor(Executor):
    """Tasks as Ray tasks on an existing cluster (`address`: ``host:port`` or ``auto``) or on one started
    here (`address` None: ``ray.init()`` with `workers` CPUs). A task whose worker process dies (killed,
    out of memory, node lost) is retried up to `max_retries` times by Ray; a task that raises is not (the
    same input would fail again) and is reported with its log."""

    def __init__(
        self,
        address: str | None = None,
        workers: int = 2,
        max_retries: int = 3,
        cpus_per_task: float = 1.0,
        runtime_env: dict[str, Any] | None = None,
        progress: bool = True,
        log_dir: str | Path | None = None,
    ) -> None:
        import ray

        super().__init__(progress, log_dir)
        self.max_retries, self.cpus_per_task = max_retries, cpus_per_task
        if not ray.is_initialized():
            local = {"num_cpus": workers, "include_dashboard": False} if not address else {}
            ray.init(address=address or None, runtime_env=runtime_env or None, log_to_driver=False,
                     logging_level="WARNING", **local)

    def _run(self, fn, todo, label, bar) -> Iterator[Outcome]:
        import ray

        remote = ray.remote(run_task).options(
            max_retries=self.max_retries, retry_exceptions=False, num_cpus=self.cpus_per_task
        )
        refs = {remote.remote(fn, a, label, task_name(i), self.log_dir): i for i, a in todo}
        pending = list(refs)
        while pending:  # everything finished within a second at once: no O(tasks) scan per result
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in ready:
                try:
                    yield refs[ref], ray.get(ref)
                except Exception as err:  # noqa: BLE001 — reported with the other failures of the stage
                    yield refs[ref], err


def make_executor(cfg: dict, output_dir: Path, progress: bool = True) -> Executor:
    """The executor named by `cfg["name"]`; tasks log under ``output_dir/logs``."""
    name = cfg.get("name", "local")
    logs = output_dir / "logs"
    if name == "local":
        return LocalExecutor(int(cfg.get("workers", 1)), progress, logs)
    if name == "slurm":
        return SlurmExecutor(output_dir / "work" / "slurm", progress, logs, **dict(cfg.get("slurm") or {}))
    if name == "ray":
        return RayExecutor(
            cfg.get("address"),
            int(cfg.get("workers", 2)),
            int(cfg.get("max_retries", 3)),
            float(cfg.get("cpus_per_task", 1.0)),
            dict(cfg.get("runtime_env") or {}),
            progress,
            logs,
        )
    raise ValueError(f"executor.name={name!r} is not one of local, slurm, ray")
