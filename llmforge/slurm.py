"""Running under SLURM: checkpoint and requeue on the warning signal, resume when the job starts again.

SLURM warns a job before its time limit with a signal (`#SBATCH --signal=USR2@90`, which
conf/hydra/launcher/slurm.yaml sets through submitit), and a preempting admin or a test sends one
(`scancel -s USR1 JOB`). `Requeue` turns SIGUSR1 or SIGUSR2 into: at the next optimizer-step boundary
every rank stops together, the checkpoint is saved (`last.ckpt`), rank 0 puts the job back in the queue
(`scontrol requeue`) and the processes exit. SLURM starts the job again with ``SLURM_RESTART_COUNT`` > 0,
and `llmforge.training.resolve_resume` continues from ``last.ckpt``.

Lightning's own SLURM auto-requeue is switched off (`plugins`): it saves from inside the signal handler,
wherever the step happens to be, and keeps training until SLURM kills the job, so the requeued run could
find a later ``last.ckpt`` than the state saved at the signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

# SIGUSR1: Lightning's and most clusters' convention; SIGUSR2: submitit's (`--signal=USR2@<delay>`)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
REQUEUED_EXIT_CODE = 75  # EX_TEMPFAIL: what the processes of a requeued job exit with


def under_slurm() -> bool:
    """A SLURM batch job or step whose tasks are this run's ranks (not an interactive salloc shell)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def restart_count() -> int:
    """How many times SLURM has started this job again (requeue, preemption, node failure)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
    return int(value) if value.isdigit() else 0


def job_id() -> str:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ["SLURM_JOB_ID"]


def plugins() -> list[Any]:
    """Trainer plugins under SLURM: its cluster environment, without Lightning's in-handler requeue."""
    if not under_slurm():
        return []
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]


class Requeue(L.Callback):
    """On SIGUSR1/SIGUSR2: checkpoint at the next step boundary on all ranks, requeue the job, stop.

    `save(trainer)` writes the checkpoint a restarted run resumes from (every rank calls it). After
    `fit`, `requeued` tells the caller to exit without the end-of-run work; a failed ``scontrol requeue``
    is logged and training goes on (the state is saved all the same).
    """

    def __init__(self, save: Callable[[L.Trainer], Path], signals: tuple[int, ...] = REQUEUE_SIGNALS):
        self.save = save
        self.signals = signals
        self.received: int | None = None
        self.requeued = False
        self._step = -1
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum  # acted on at the next step boundary, where all ranks agree

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # replaces submitit's handler too: it would requeue without saving the model
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self._step:  # inside a gradient accumulation: not a step boundary
            return
        self._step = trainer.global_step
        # a signal reaches the ranks at different moments: any rank that has it decides for all
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = signal.Signals(self.received).name if self.received else "a requeue signal (another rank)"
        path = self.save(trainer)
        ok = True
        if trainer.is_global_zero:
            cmd = ["scontrol", "requeue", job_id()]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            ok = proc.returncode == 0
            if ok:
                log.warning(f"{name} at step {trainer.global_step}: saved {path}, requeued job {cmd[2]}")
            else:
                log.error(f"{name}: saved {path}, but `{' '.join(cmd)}` failed: {proc.stderr.strip()}")
        ok = trainer.strategy.broadcast(ok, src=0)
        self.received = None
        if ok:
            self.requeued = True
            trainer.should_stop = True


# -- the launcher's defaults, fitted to the partition; submitit's sacct warning, once ---------------------
_said: set[str] = set()


def parse_time_limit(text: str) -> float | None:
    """Minutes of a SLURM time limit as sinfo prints it (``60``, ``1:00:00``, ``2-00:00:00``,
    ``infinite``/``UNLIMITED``: None)."""
    text = text.strip()
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        minutes = float(parts[0])  # minutes
    elif len(parts) == 2:
        minutes = parts[0] + parts[1] / 60  # minutes:seconds
    else:
        minutes = parts[0] * 60 + parts[1] + parts[2] / 60
    return minutes + (int(days) * 1440 if days else 0)


def partition_limits(
    partition: str | None, sinfo_output: str | None = None
) -> tuple[int, float | None] | None:
    """(CPUs per node, time limit in minutes or None) of ``partition`` (None: the cluster's default, marked
    ``*`` by sinfo), from ``sinfo -h -o "%P %c %l"``; None where sinfo does not answer."""
    if sinfo_output is None:
        try:
            sinfo_output = subprocess.run(
                ["sinfo", "-h", "-o", "%P %c %l"], capture_output=True, text=True, timeout=20, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    rows = []
    for line in sinfo_output.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        name, cpus, limit = fields[0], fields[1].rstrip("+"), fields[2]
        default = name.endswith("*")
        name = name.rstrip("*")
        if (partition is None and default) or name == partition:
            rows.append((int(cpus) if cpus.isdigit() else 0, parse_time_limit(limit)))
    if not rows:
        return None
    cpus = min(c for c, _ in rows)
    limits = [m for _, m in rows if m is not None]
    return cpus, (min(limits) if limits else None)


def fit_to_partition(
    key: str, requested: Any, partition: Any, tasks_per_node: Any = 1, sinfo_output: str | None = None
) -> Any:
    """The resolver ``llmforge.slurm_fit`` of conf/hydra/launcher/slurm.yaml: ``requested`` for
    ``key`` (``cpus_per_task`` or ``timeout_min``), lowered to what the partition offers (CPUs per node /
    tasks per node; its time limit), with one line saying so; unchanged where sinfo does not answer."""
    limits = partition_limits(
        None if partition in (None, "None", "null", "") else str(partition), sinfo_output
    )
    if limits is None:
        return requested
    cpus, minutes = limits
    tasks = int(tasks_per_node) if str(tasks_per_node).isdigit() else 1
    if key == "cpus_per_task":
        allowed: Any = max(1, cpus // max(1, tasks)) if cpus else requested
    elif key == "timeout_min":
        allowed = int(minutes) if minutes is not None else requested
    else:
        raise ValueError(f"llmforge.slurm_fit: unknown key {key!r}")
    if requested is None or int(requested) <= int(allowed):
        return requested
    where = (
        f"partition {partition}" if partition not in (None, "None", "null", "") else "the default partition"
    )
    message = (
        f"slurm: hydra.launcher.{key}={requested} is more than {where} offers; using {allowed} "
        f"(set hydra.launcher.{key}= to choose)"
    )
    if message not in _said:
        _said.add(message)
        print(message, flush=True)
    return allowed


class OnceFilter(logging.Filter):
    """Lets the first record containing ``marker`` through, drops the later ones (submitit repeats its
    "Bypassing sacct error" warning at every poll of every job where accounting is not set up)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker, self.seen = marker, False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.marker not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def sacct_warning_once() -> None:
    logger = logging.getLogger("submitit")
    if not any(isinstance(f, OnceFilter) for f in logger.filters):
        logger.addFilter(OnceFilter("Bypassing sacct error"))
