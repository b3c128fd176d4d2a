"""The executors' driver side, on the local executor: each task's own log and stats file, a failed task
named with its error and its log while the others finish, finished tasks skipped before any worker
starts, progress inside a task written to its log. (Ray: tests/test_ray.py; SLURM: tests/test_slurm.py.)"""

from __future__ import annotations

import json

import pytest

from llmforge.prep.executor import LocalExecutor
from llmforge.prep.task import Meter, TaskFailed

CALLS: list[int] = []


def square_or_fail(i: int) -> int:
    CALLS.append(i)
    if i == 1:
        raise ValueError(f"bad shard {i}")
    return i * i


def count_three() -> str:
    with Meter("counting", total=3, unit="docs", every_s=0) as m:
        for _ in range(3):
            m.advance()
    return "counted"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_task_is_named_with_its_error_and_log(tmp_path, workers):
    logs = tmp_path / "logs"
    ex = LocalExecutor(workers, progress=False, log_dir=logs)
    with pytest.raises(TaskFailed) as info:
        ex.map(square_or_fail, [(i,) for i in range(3)], label="square")
    message = str(info.value)
    assert "1 of 3 square tasks failed" in message
    assert f"square/00001: ValueError: bad shard 1 (log: {logs / 'square' / '00001.log'})" in message
    log = (logs / "square" / "00001.log").read_text()
    assert "start square/00001" in log and "Traceback" in log and "ValueError: bad shard 1" in log
    failed = json.loads((logs / "square" / "00001.json").read_text())
    assert failed["status"] == "failed" and failed["error"] == "ValueError: bad shard 1"
    for i in (0, 2):  # the other tasks ran to the end
        ok = json.loads((logs / "square" / f"{i:05d}.json").read_text())
        assert ok["status"] == "ok" and ok["result"] == i * i and ok["seconds"] >= 0


def test_finished_tasks_are_skipped_before_running(tmp_path):
    CALLS.clear()
    ex = LocalExecutor(1, progress=False, log_dir=tmp_path / "logs")
    done = {0: 100, 2: 104}  # what a task's marker check returns when it is finished
    results = ex.map(square_or_fail, [(0,), (2,), (3,)], label="square", cached=lambda i: done.get(i))
    assert results == [100, 104, 9] and CALLS == [3]
    assert sorted(p.name for p in (tmp_path / "logs" / "square").iterdir()) == ["00002.json", "00002.log"]


def test_progress_inside_a_task_goes_to_its_log(tmp_path):
    ex = LocalExecutor(1, progress=True, log_dir=tmp_path / "logs")  # in-process: a live bar as well
    assert ex.run(count_three, label="count") == "counted"
    log = (tmp_path / "logs" / "count" / "00000.log").read_text()
    assert "counting: 2 docs" in log and "66.7% of 3, ETA" in log and "counting: 3 docs" in log
