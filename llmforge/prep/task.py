"""What surrounds every data-stage task, wherever it runs (a local worker, a SLURM array task, a Ray task).

`run_task` gives each task its own log file and stats file under the output directory,
``logs/<stage>/<task>.log`` and ``logs/<stage>/<task>.json``. The log has the task's start (host, pid), its
progress lines, its end or the full traceback of its failure; the stats file says ``"status": "ok"`` or
``"failed"`` with the error, the seconds taken and the task's result. Among thousands of tasks the failed
ones are ``grep -l '"failed"' logs/*/*.json``; rerunning the same command redoes only them (finished tasks
are skipped by their markers). A retried attempt (Ray) appends to the same log.

`Meter` is progress inside a task: the task counts what it has done; every few seconds a line with the
count, the rate and, when the total is known, the ETA goes to the task's log; and when the task runs in the
driver (a single-task stage on the local executor) a live Rich bar shows the same.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("llmforge.task")
T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TaskFailed(RuntimeError):
    """One or more tasks of a stage failed; the message names each one, its error and its log."""


# The driver's live Rich progress while a task runs in the driver itself; None in a worker process.
_live: Any = None


def task_paths(log_dir: str | Path, stage: str, task: str) -> tuple[Path, Path]:
    base = Path(log_dir) / stage
    return base / f"{task}.log", base / f"{task}.json"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def run_task(
    fn: Callable[..., Any], args: tuple, stage: str, task: str, log_dir: str | None, live: Any = None
) -> Any:
    """`fn(*args)` with its own log and stats files (none when `log_dir` is None); re-raises a failure."""
    global _live
    if log_dir is None:
        return fn(*args)
    log_path, stats_path = task_paths(log_dir, stage, task)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")  # a retry appends
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    # the task's own lines go to its file only, not to the driver's console when it runs in-process
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    previous_live, _live = _live, live
    info = {"stage": stage, "task": task, "host": socket.gethostname(), "pid": os.getpid()}
    log.info("start %s/%s on %s, pid %d", stage, task, info["host"], info["pid"])
    start = time.perf_counter()
    try:
        result = fn(*args)
        seconds = time.perf_counter() - start
        log.info("done in %.2f s", seconds)
    except BaseException as err:
        seconds = time.perf_counter() - start
        log.error("failed after %.2f s: %s: %s\n%s", seconds, type(err).__name__, err, traceback.format_exc())
        error = f"{type(err).__name__}: {err}"
        failed = {"status": "failed", "error": error, "seconds": seconds, "log": str(log_path)}
        _write_json(stats_path, info | failed)
        raise
    finally:
        _live = previous_live
        root.removeHandler(handler)
        log.removeHandler(handler)
        handler.close()
    _write_json(stats_path, info | {"status": "ok", "seconds": seconds, "result": result})
    return result


class Meter:
    """Counts a task's progress; logs count, rate and ETA every `every_s` seconds; drives a live bar.
    ``with Meter("tokenize", total=n) as m: ... m.advance(k)``, or call `close` at the end."""

    def __init__(self, description: str, total: float | None = None, unit: str = "docs", every_s: float = 10.0
                 ) -> None:
        self.description, self.total, self.unit, self.every_s = description, total, unit, every_s
        self.done = 0.0
        self.start = self.last = time.monotonic()
        self.bar_id = _live.add_task(description, total=total, unit=unit) if _live is not None else None

    def advance(self, n: float = 1) -> None:
        self.done += n
        if self.bar_id is not None:
            _live.update(self.bar_id, advance=n)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line())

    def counted(self, items: Iterable[T]) -> Iterator[T]:
        """The items, each advancing the meter by one as it passes."""
        for item in items:
            self.advance()
            yield item

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.description}: {self.done:,.0f} {self.unit}, {rate:,.0f} {self.unit}/s"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            text += f", {100 * self.done / self.total:.1f}% of {self.total:,.0f}, ETA {eta:,.0f} s"
        return text

    def close(self) -> None:
        log.info("%s (finished)", self.line())
        if self.bar_id is not None and _live is not None:
            _live.remove_task(self.bar_id)
            self.bar_id = None

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
