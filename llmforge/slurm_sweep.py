"""A SLURM sweep (``hydra/launcher=slurm``, hydra-submitit-launcher) that says why it waits and cleans up
after itself.

While jobs are pending, every ``poll_s`` seconds (60) one line gives SLURM's reason for each pending job
(``Resources``, ``PartitionTimeLimit``, ...: `pending_reasons`, from ``squeue``); Ctrl-C cancels the
sweep's jobs instead of leaving them queued (`wait_for`). `install` puts `wait_for` between submitit's
submission of the job array and the plugin's collection of the results (Hydra accepts launchers only from
its ``hydra_plugins`` package, so the plugin is kept and its executor wrapped); `llmforge.multirun`'s
sweep callback calls it in the sweep's process. Submission and results are the plugin's.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any


def pending_reasons(job_ids: Sequence[str], squeue_output: str | None = None) -> dict[str, str]:
    """{job id: SLURM's reason} of the jobs among ``job_ids`` that are pending (``squeue -h -r -o
    "%i|%T|%r"``); empty where squeue does not answer."""
    if squeue_output is None:
        arrays = sorted({str(j).split("_")[0] for j in job_ids})
        try:
            squeue_output = subprocess.run(
                ["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T|%r"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    wanted = {str(j) for j in job_ids}
    out = {}
    for line in squeue_output.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 3 and fields[1] == "PENDING" and (fields[0] in wanted or not wanted):
            out[fields[0]] = fields[2]
    return out


def wait_for(
    jobs: Sequence[Any],
    poll_s: float = 60.0,
    say: Callable[[str], None] = print,
    reasons: Callable[[Sequence[str]], dict[str, str]] = pending_reasons,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    tick_s: float = 5.0,
) -> None:
    """Wait until every job is done (checked every ``tick_s``); every ``poll_s`` say why the pending ones
    wait; on Ctrl-C cancel them all and re-raise."""
    try:
        last = clock()
        while not all(job.done() for job in jobs):
            if clock() - last >= poll_s:
                last = clock()
                waiting = reasons([job.job_id for job in jobs])
                if waiting:
                    listed = ", ".join(f"{jid} ({reason})" for jid, reason in sorted(waiting.items()))
                    say(f"slurm: {len(waiting)} of {len(jobs)} jobs pending: {listed}")
            sleep(min(tick_s, poll_s))
    except KeyboardInterrupt:
        for job in jobs:
            try:
                job.cancel(check=False)
            except Exception:  # noqa: BLE001 - cancel what can be cancelled, then stop
                pass
        say(f"slurm: interrupted: cancelled {', '.join(str(job.job_id) for job in jobs)}")
        raise


def install(poll_s: float = 60.0) -> bool:
    """Make submitit's ``AutoExecutor.map_array`` (how the launcher submits a sweep) wait with `wait_for`
    before returning the jobs; idempotent. False where submitit is not installed."""
    try:
        import submitit
    except ImportError:
        return False
    submit = submitit.AutoExecutor.map_array
    if getattr(submit, "llmforge_waits", False):
        return True

    def map_array(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
        jobs = submit(executor, fn, *iterables)
        wait_for(jobs, poll_s=poll_s)
        return jobs

    map_array.llmforge_waits = True  # type: ignore[attr-defined]
    submitit.AutoExecutor.map_array = map_array  # type: ignore[method-assign]
    return True
