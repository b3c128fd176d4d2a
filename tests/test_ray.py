"""The data stage on a real Ray head (.ci/ray-up.sh starts a local one): the demo prepare gives the same
bytes as the local executor, and a task whose worker is killed is retried by Ray. Skipped where no Ray head
answers, unless LLMFORGE_REQUIRE_RAY=1 (CI) makes that a failure. The head is found at
$LLMFORGE_RAY_ADDRESS, else in the address file `make ray-up` writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import clean_env, crawl_args, outputs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def ray_head() -> tuple[str | None, str | None]:
    """(address, None) when a Ray head answers, else (None, why not)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None, "ray is not installed (pip install -e '.[ray]')"
    address = os.environ.get("LLMFORGE_RAY_ADDRESS")
    if not address:
        path = Path(os.environ.get("LLMFORGE_RAY_DIR", "/tmp/llmforge-ray")) / "address"
        if not path.exists():
            return None, "no Ray head: set LLMFORGE_RAY_ADDRESS or start one with `make ray-up`"
        address = path.read_text().strip()
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        return None, f"the Ray head at {address} does not answer ({err})"
    return address, None


@pytest.fixture(scope="module")
def address() -> str:
    found, problem = ray_head()
    if found:
        return found
    if os.environ.get("LLMFORGE_REQUIRE_RAY") == "1":
        pytest.fail(f"LLMFORGE_REQUIRE_RAY=1 but {problem}")
    pytest.skip(problem)


def test_prepare_on_ray_matches_local(address, crawl, crawl_local, tmp_path):
    common = crawl_args(crawl)
    # dedup as 3 tasks a stage on Ray (1 locally): the same bytes whatever the split
    cmd = [sys.executable, "-m", "llmforge.prepare", *common, f"output_dir={tmp_path}/ray", "executor=ray",
           f"executor.address={address}", "dedup.tasks=3"]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    stdout, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 0, (stdout + stderr)[-4000:]
    expected = outputs(crawl_local)
    assert len(expected) >= 6 and outputs(tmp_path / "ray") == expected
    # every shard ran as a Ray task, in a worker process of the head, not in the driver
    logs = sorted((tmp_path / "ray" / "logs" / "process").glob("*.json"))
    tasks = [json.loads(p.read_text()) for p in logs]
    assert len(tasks) == len(list(crawl.glob("*.warc.gz"))) == 4
    assert all(t["status"] == "ok" and t["pid"] != driver.pid for t in tasks)
    # and so did every dedup task: 3 exact, 3 bucket, 3 verify tasks and the components task
    for stage, count in (("exact", 3), ("buckets", 3), ("verify", 3), ("components", 1)):
        logs = (tmp_path / "ray" / "logs" / f"dedup-{stage}").glob("*.json")
        tasks = [json.loads(p.read_text()) for p in logs]
        assert len(tasks) == count, stage
        assert all(t["status"] == "ok" and t["pid"] != driver.pid for t in tasks), stage
    stats = json.loads((tmp_path / "ray" / "work" / "dedup" / "stats.json").read_text())
    assert stats["tasks"] == 3 and stats["exact_dropped"] + stats["near_dropped"] > 0


# Run as the driver in its own process (`python -c`): its functions travel to the Ray workers by value.
KILLED_ONCE = """
import os, signal, sys
from pathlib import Path
from llmforge.prep.executor import RayExecutor
from llmforge.prep.task import TaskFailed

def square_but_die_once(flag_dir, i):
    attempts = Path(flag_dir) / f"{i}.attempts"
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()}\\n")
    if i == 1 and len(attempts.read_text().split()) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-task, as on an out-of-memory kill
    return i * i

address, flags, logs, retries = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ex = RayExecutor(address=address, max_retries=retries, progress=False, log_dir=logs)
try:
    print("RESULT", ex.map(square_but_die_once, [(flags, i) for i in range(3)], label="square"))
except TaskFailed as err:
    print("FAILED", err)
"""


@pytest.mark.parametrize("retries", [2, 0])
def test_a_task_whose_worker_dies_is_retried(address, tmp_path, retries):
    flags, logs = tmp_path / "flags", tmp_path / "logs"
    flags.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_ONCE, address, str(flags), str(logs), str(retries)],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    attempts = (flags / "1.attempts").read_text().split()
    log = (logs / "square" / "00001.log").read_text()
    if retries:
        assert "RESULT [0, 1, 4]" in proc.stdout, proc.stdout + proc.stderr[-2000:]
        assert len(attempts) == 2 and attempts[0] != attempts[1]  # a second worker process finished it
        assert log.count("start square/00001") == 2 and "done in" in log
        assert json.loads((logs / "square" / "00001.json").read_text())["status"] == "ok"
    else:  # no retry: the stage fails and names the task and its log
        assert len(attempts) == 1
        assert "FAILED 1 of 3 square tasks failed" in proc.stdout and "square/00001" in proc.stdout
        assert str(logs / "square" / "00001.log") in proc.stdout
        assert "WorkerCrashedError" in proc.stdout or "died" in proc.stdout, proc.stdout
