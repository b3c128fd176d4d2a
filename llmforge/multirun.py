"""Hydra multirun with multi-process strategies on this machine: each job starts its own ranks.

Lightning starts the other ranks of a run on this machine (ddp, fsdp with several devices) by running the
command line again (`_SubprocessScriptLauncher`). Under ``-m`` that command line is the whole sweep, so
every child rank re-runs the sweep (docs/architecture.md: the sweep ran twice, into two sweep folders), and
the sweep process keeps ``LOCAL_RANK``, ``WORLD_SIZE`` and ``MASTER_PORT`` in its environment after the
first job, so the next job believes its ranks were started for it and inherits the first job's port.

So under a local multirun, a job that needs several processes runs in a fresh ``python -m llmforge.train``
of its own: single-run mode, the job's own overrides, ``hydra.run.dir`` = the job's directory, and an
environment without rank variables. There Lightning starts the job's ranks exactly as for any single run,
and they all end with the job. Jobs whose ranks are started by someone else (SLURM tasks through
submitit, torchrun) and single-process jobs run in the sweep process as before.

Every sweep's job folder is named by its number and the overrides the sweep varies
(``runs/<name>/multirun/1_optim.lr=0.0003``: `job_dirname`, the ``llmforge.job_dir`` resolver), and the
sweep ends with a table of its jobs: overrides, final step, train and val loss, checkpoint (`SweepCallback`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"  # written by rank 0 at the end of every run (train.py): the sweep's return value

# set by distributed launchers; a job started in a clean environment must not see them
RANK_ENV_PREFIXES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
# hydra overrides that belong to the sweep, not to one of its jobs
SWEEP_OVERRIDES = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run.dir",
    "hydra.output_subdir",
)


def local_processes(accelerator: str, devices: Any) -> int:
    """How many processes Lightning starts on this machine for `hardware.devices`."""
    if isinstance(devices, int) or (isinstance(devices, str) and devices.strip().lstrip("-").isdigit()):
        n = int(devices)
        if n != -1:
            return n
        devices = "auto"
    if devices == "auto":
        if accelerator in ("gpu", "cuda", "auto"):
            import torch

            return max(1, torch.cuda.device_count())
        return 1
    if isinstance(devices, str):  # "0,1,3": device indices
        return len([d for d in devices.split(",") if d.strip()])
    return len(devices)  # a list of device indices


def processes_started_externally() -> bool:
    """SLURM tasks (submitit, srun) or torchrun already are the ranks: Lightning starts none."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return "LOCAL_RANK" in os.environ or SLURMEnvironment.detect() or TorchElasticEnvironment.detect()


def needs_own_processes(hardware: Any) -> bool:
    """True for a job of a local Hydra multirun that needs several processes on this machine."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    if local_processes(str(hardware.accelerator), hardware.devices) <= 1:
        return False
    return not processes_started_externally()


def config_flags(argv: list[str]) -> list[str]:
    """--config-name/--config-path/--config-dir (and short forms) from the sweep's command line."""
    flags, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in CONFIG_FLAGS and i + 1 < len(argv):
            flags += argv[i : i + 2]
            i += 2
            continue
        if arg.split("=", 1)[0] in CONFIG_FLAGS:
            flags.append(arg)
        i += 1
    return flags


def job_command(module: str = "llmforge.train") -> tuple[list[str], str, Path]:
    """The command that runs this sweep job alone, its working directory and the job's output dir."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    hydra_overrides = [o for o in hc.overrides.hydra if not o.split("=", 1)[0].startswith(SWEEP_OVERRIDES)]
    quoted_dir = str(job_dir).replace("\\", "\\\\").replace('"', '\\"')
    command = [
        sys.executable,
        "-m",
        module,
        *config_flags(sys.argv[1:]),
        *hc.overrides.task,
        *hydra_overrides,
        *([] if any(o.startswith("run_dir=") for o in hc.overrides.task) else [f'run_dir="{quoted_dir}"']),
        f'hydra.run.dir="{quoted_dir}"',
        "hydra.output_subdir=null",  # the sweep already saved this job's .hydra/ record
    ]
    return command, hc.runtime.cwd, job_dir


def clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(RANK_ENV_PREFIXES)}


def run_job_in_own_processes() -> float | None:
    """Runs the current sweep job in a fresh process (which starts the job's ranks); returns its result."""
    from hydra.core.hydra_config import HydraConfig

    command, cwd, job_dir = job_command()
    result_file = job_dir / RESULT_FILE
    result_file.unlink(missing_ok=True)
    print(f"job {HydraConfig.get().job.num}: starting its ranks in {job_dir}", flush=True)
    returncode = subprocess.run(command, cwd=cwd, env=clean_environment(), check=False).returncode
    if returncode != 0:
        num = HydraConfig.get().job.num
        raise RuntimeError(f"job {num} failed (exit code {returncode}): {' '.join(command)}")
    if not result_file.exists():
        return None
    return json.loads(result_file.read_text())["metrics"].get("val/loss")


def write_result(run_dir: Path, global_step: int, last_checkpoint: Path, metrics: dict[str, float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    result = {"global_step": global_step, "last_checkpoint": str(last_checkpoint), "metrics": metrics}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")


# -- job folders named by their overrides, and the table at the end of a sweep ---------------------------
SWEPT_ENV = "LLMFORGE_SWEPT_KEYS"  # the sweep's varying keys, for jobs that run in other processes (SLURM)
SWEEP_PREFIXES = ("range(", "choice(", "glob(", "interval(", "shuffle(", "sort(")
MAX_DIRNAME = 120


def swept_keys(argv: list[str]) -> list[str]:
    """The keys a sweep's command line varies: ``optim.lr=1e-3,3e-4`` or ``model=choice(125m,1b)``."""
    keys = []
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        if value.startswith(SWEEP_PREFIXES) or _top_level_comma(value):
            keys.append(key)
    return keys


def _top_level_comma(value: str) -> bool:
    depth, quote = 0, ""
    for ch in value:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def job_dirname(num: Any, overrides: list[str], keys: list[str]) -> str:
    """A sweep job's folder: its number, then the values of the swept keys (``1_optim.lr=3e-4``)."""
    parts = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in keys:
            parts.append(override.lstrip("+~"))
    name = "_".join([str(num), ",".join(parts)]) if parts else str(num)
    for bad in ("/", "\\", "\0"):
        name = name.replace(bad, "_")
    return name[:MAX_DIRNAME]


def sweep_subdir() -> str:
    """``hydra.sweep.subdir`` (resolver ``llmforge.job_dir``): `job_dirname` of the current job. The swept
    keys come from the environment `SweepCallback` set in the sweep's process (jobs on SLURM nodes have
    their own command line), else from this process's command line."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    if SWEPT_ENV in os.environ:
        keys = [k for k in os.environ[SWEPT_ENV].split(" ") if k]
    else:
        keys = swept_keys(sys.argv[1:])
    return job_dirname(hc.job.num, list(hc.overrides.task), keys)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder of a sweep: number, swept overrides, final train/val loss, checkpoint."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit()):
        num, _, overrides = job.name.partition("_")
        row: dict[str, Any] = {"job": int(num), "overrides": overrides or "-", "dir": str(job)}
        result = job / RESULT_FILE
        if result.is_file():
            data = json.loads(result.read_text())
            row |= {
                "train/loss": data["metrics"].get("train/loss"),
                "val/loss": data["metrics"].get("val/loss"),
                "checkpoint": data["last_checkpoint"],
                "step": data["global_step"],
            }
        rows.append(row)
    return sorted(rows, key=lambda r: r["job"])


def format_rows(rows: list[dict[str, Any]]) -> str:
    def loss(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    table = [("job", "overrides", "step", "train/loss", "val/loss", "checkpoint")]
    for r in rows:
        ckpt = r.get("checkpoint") or "(no result: failed or still running)"
        step = str(r.get("step", "-"))
        table.append(
            (str(r["job"]), r["overrides"], step, loss(r.get("train/loss")), loss(r.get("val/loss")), ckpt)
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in table
    )


try:  # a Hydra callback (conf/train.yaml: hydra.callbacks.sweep_table); Hydra is always installed here
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class SweepCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback of a sweep's own process: at the start, puts the swept keys in the environment (which
    the jobs it starts or submits inherit: sbatch exports it) and, for a SLURM sweep, installs
    `llmforge.slurm_sweep`'s waiting; at the end, prints `format_rows`."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        os.environ[SWEPT_ENV] = " ".join(swept_keys(sys.argv[1:]))
        if "submitit" in str(config.hydra.launcher.get("_target_", "")):  # a SLURM sweep
            from llmforge import slurm_sweep
            from llmforge.slurm import sacct_warning_once

            sacct_warning_once()  # submitit polls from this process
            slurm_sweep.install()  # pending reasons every minute; Ctrl-C cancels the jobs

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            print(f"\nsweep {sweep_dir}\n{format_rows(job_rows(sweep_dir))}", flush=True)
