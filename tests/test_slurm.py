"""Against a real SLURM (.ci/slurm-up.sh brings up a single-node one): a 2-job sweep through
hydra/launcher=slurm, preemption (requeue signal -> checkpoint -> requeue -> resume), and the data
stage's SLURM executor. Skipped where no SLURM answers, unless LLMFORGE_REQUIRE_SLURM=1 (CI) makes that
a failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import clean_env, crawl_args, outputs, run_cli

pytestmark = pytest.mark.slurm


class Throttle(L.Callback):
    """Sleeps after every training step, so a test can signal a job while it is still training."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args, **kwargs):
        time.sleep(self.seconds)


def slurm_problem() -> str | None:
    """Why SLURM cannot run jobs here, or None when a node answers."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client (sinfo/sbatch not found); .ci/slurm-up.sh starts a local SLURM"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s"
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#!%$@^-") in ("idle", "mix", "alloc") for s in states):
        return f"no SLURM node answers (sinfo: {(proc.stdout + proc.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("LLMFORGE_REQUIRE_SLURM") == "1":
        pytest.fail(f"LLMFORGE_REQUIRE_SLURM=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture
def job_name(slurm):
    """A unique SLURM job name; jobs still queued under it at the end of the test are cancelled."""
    name = f"llmforge-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", "--name", name], capture_output=True, check=False)


def job_ids(name: str) -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True)
    return proc.stdout.split()


def final_state(job_id: str, timeout: float = 60) -> str:
    """`scontrol show job` once the job has left RUNNING/COMPLETING (SLURM keeps it for MinJobAge)."""
    deadline = time.monotonic() + timeout
    while True:
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        busy = re.search(r"JobState=(RUNNING|COMPLETING|PENDING|REQUEUED)", show)
        if not busy or time.monotonic() > deadline:
            return show
        time.sleep(0.5)


def scalars(events: Path, tag: str = "train/loss") -> list[int]:
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def train_args(tiny_data: Path, name: str, *extra: str) -> list[str]:
    return [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",  # 2 tasks per job on a 2-CPU CI node
        "hydra.launcher.timeout_min=10",
        f"hydra.launcher.name={name}",
        "hydra.sweep.dir=sweep",
        "strategy=ddp",
        "hardware.devices=2",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=2",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        *extra,
    ]


@pytest.mark.slow
def test_sweep_of_two_jobs_with_two_tasks_each(tmp_path, tiny_data, job_name):
    proc = run_cli(
        "llmforge.train",
        *train_args(tiny_data, job_name, "optim.lr=1e-3,3e-4", "trainer.max_steps=3"),
        cwd=tmp_path,
        timeout=420,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep = tmp_path / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0_optim.lr=0.001", "1_optim.lr=0.0003"]
    for job in jobs:
        manifest = json.loads((job / "run_manifest.json").read_text())
        assert manifest["world_size"] == 2
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((job / "result.json").read_text())["global_step"] == 3
        events = list((job / "tb").glob("events.out.tfevents.*"))
        assert len(events) == 1 and scalars(events[0]) == [0, 1, 2]
    # each job ran as SLURM tasks: one submitit log per task, two tasks per job
    logs = sorted(p.name for p in (sweep / ".submitit").rglob("*_log.out"))
    assert len(logs) == 4 and {re.sub(r"^\d+_", "", n) for n in logs} == {
        "0_0_log.out",
        "0_1_log.out",
        "1_0_log.out",
        "1_1_log.out",
    }


@pytest.mark.slow
def test_requeue_signal_checkpoints_requeues_and_resumes(tmp_path, tiny_data, job_name):
    max_steps = 16
    cmd = [
        sys.executable,
        "-m",
        "llmforge.train",
        *train_args(
            tiny_data,
            job_name,
            f"trainer.max_steps={max_steps}",
            "trainer.ckpt_every_n_steps=4",
            "+callbacks.throttle._target_=tests.test_slurm.Throttle",
            "+callbacks.throttle.seconds=0.5",
        ),
    ]
    log = open(tmp_path / "client.log", "w")
    client = subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    job_dir = tmp_path / "sweep" / "0"
    try:
        deadline = time.monotonic() + 240
        while not (job_dir / "checkpoints" / "step0000004.ckpt").exists():  # training is under way
            running = client.poll() is None and time.monotonic() < deadline
            assert running, (tmp_path / "client.log").read_text()[-4000:]
            time.sleep(0.5)
        (job_id,) = job_ids(job_name)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        client.wait(timeout=300)
    finally:
        if client.poll() is None:
            client.kill()
        log.close()
    output = (tmp_path / "client.log").read_text()
    assert client.returncode == 0, output[-4000:]

    show = final_state(job_id)
    assert "Restarts=1" in show and "JobState=COMPLETED" in show, show
    # two attempts, one TensorBoard file each: the second starts where the first saved, none repeated
    events = sorted((job_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(events) == 2, events
    first, second = scalars(events[0]), scalars(events[1])
    assert first == list(range(len(first))) and 4 < len(first) < max_steps, first
    assert second == list(range(len(first), max_steps)), (first, second)
    train_log = (job_dir / "train.log").read_text()
    assert f"at step {len(first)}: saved" in train_log and "requeued job" in train_log
    assert re.search(r"Restoring states from the checkpoint path at .*last\.ckpt", train_log)
    assert json.loads((job_dir / "result.json").read_text())["global_step"] == max_steps


@pytest.mark.slow
def test_prepare_slurm_executor_matches_local(tmp_path, crawl, job_name, crawl_local):
    on_slurm = run_cli(
        "llmforge.prepare",
        *crawl_args(crawl),
        f"output_dir={tmp_path}/slurm",
        "executor=slurm",
        "executor.slurm.cpus_per_task=1",
        "executor.slurm.mem_gb=1",
        "executor.slurm.timeout_min=10",
        f"+executor.slurm.name={job_name}",
        cwd=tmp_path,
        timeout=300,
    )
    assert on_slurm.returncode == 0, (on_slurm.stdout + on_slurm.stderr)[-4000:]
    expected = outputs(crawl_local)
    assert len(expected) >= 6 and outputs(tmp_path / "slurm") == expected
    # the shards really ran as SLURM array tasks: one submitit result per input file (4) plus global stages
    results = list((tmp_path / "slurm" / "work" / "slurm").glob("*_result.pkl"))
    assert len(list(crawl.glob("*.warc.gz"))) == 4 and len(results) > 4
