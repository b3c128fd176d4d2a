"""SLURM pieces that need no cluster: the launcher config, resume after a restart, and the requeue
callback in one process under a faked SLURM environment (a stand-in `scontrol` records the requeue).
tests/test_slurm.py runs the same paths against a real SLURM."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmforge.training import resolve_resume, run
from tests.conftest import CONF


class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process once `step` optimizer steps are done (what SLURM would do)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def launcher(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_launcher_has_one_task_per_rank_and_gpus_only_on_gpus():
    gpu = launcher("hardware=multinode", "hydra.launcher.partition=gpu")
    assert (gpu["nodes"], gpu["tasks_per_node"], gpu["gpus_per_node"]) == (2, 8, 8)
    assert gpu["partition"] == "gpu" and gpu["signal_delay_s"] > 0
    assert gpu["additional_parameters"]["requeue"] is True
    assert gpu["_target_"].endswith("SlurmLauncher")
    cpu = launcher("hardware.devices=2")
    assert (cpu["nodes"], cpu["tasks_per_node"], cpu["gpus_per_node"]) == (1, 2, None)


SINFO = "debug* 2 1:00:00\ngpu 64 2-00:00:00\nlong 16 infinite\n"  # sinfo -h -o "%P %c %l"


def test_launcher_defaults_fit_the_partition(tmp_path, monkeypatch, capsys):
    from llmforge import slurm

    assert slurm.parse_time_limit("1:00:00") == 60 and slurm.parse_time_limit("2-00:00:00") == 2880
    assert slurm.parse_time_limit("30") == 30 and slurm.parse_time_limit("infinite") is None
    assert slurm.partition_limits(None, SINFO) == (2, 60)  # the default partition, marked *
    assert slurm.partition_limits("long", SINFO) == (16, None)
    assert slurm.partition_limits("nosuch", SINFO) is None
    # the CI's case: 8 CPUs per task and 240 minutes asked, a 2-CPU node and 60 minutes offered
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text(f"#!/bin/sh\nprintf '{SINFO}'\n")
    (fake / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "_said", set())  # an earlier test in this process may have said these lines
    small = launcher()
    assert (small["cpus_per_task"], small["timeout_min"]) == (2, 60)
    out = capsys.readouterr().out
    assert "hydra.launcher.cpus_per_task=8 is more than the default partition offers; using 2" in out
    assert "hydra.launcher.timeout_min=240 is more than the default partition offers; using 60" in out
    big = launcher("hydra.launcher.partition=gpu", "hardware.devices=4")
    assert (big["cpus_per_task"], big["timeout_min"]) == (8, 240)  # 64 CPUs / 4 tasks: 8 fit
    assert launcher("hydra.launcher.partition=gpu", "hardware.devices=16")["cpus_per_task"] == 4
    assert launcher("hydra.launcher.cpus_per_task=6")["cpus_per_task"] == 6  # set by hand: as given
    monkeypatch.setenv("PATH", "/nonexistent")  # no sinfo: the defaults
    assert (launcher()["cpus_per_task"], launcher()["timeout_min"]) == (8, 240)


def test_sacct_warning_is_said_once(caplog):
    import logging

    from llmforge.slurm import sacct_warning_once

    sacct_warning_once()
    sacct_warning_once()
    logger = logging.getLogger("submitit")
    with caplog.at_level(logging.WARNING, logger="submitit"):
        for call in (1, 2, 3):
            logger.warning(f"Call #{call} - Bypassing sacct error boom, status may be inaccurate.")
        logger.warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("Bypassing sacct error" in m for m in messages) == 1 and "another warning" in messages


def test_restarted_job_resumes_from_last_whatever_resume_says(train_cfg, tmp_path, monkeypatch):
    import torch

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    cfg = train_cfg()  # resume=None: a fresh run must not find checkpoints
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_resume(cfg, ckpt_dir) is None  # requeued before anything was saved: the first start
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    torch.save({"state_dict": {}, "global_step": 4}, ckpt_dir / "step0000004.ckpt")
    os.utime(ckpt_dir / "step0000004.ckpt", (1_000, 1_000))
    with pytest.raises(FileExistsError, match="resume=auto"):
        resolve_resume(cfg, ckpt_dir)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    # requeued after step 4 was saved, before last.ckpt: go on from step 4, not from the start
    assert resolve_resume(cfg, ckpt_dir) == str(ckpt_dir / "step0000004.ckpt")
    torch.save({"state_dict": {}, "global_step": 6}, ckpt_dir / "last.ckpt")
    assert resolve_resume(cfg, ckpt_dir) == str(ckpt_dir / "last.ckpt")
    assert resolve_resume(train_cfg(f"resume={ckpt_dir / 'step0000004.ckpt'}"), ckpt_dir) == str(
        ckpt_dir / "last.ckpt"
    )


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A one-task SLURM job's environment and an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "llmforge-test",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    return record


def test_requeue_signal_saves_requeues_then_restart_resumes(train_cfg, tmp_path, fake_slurm, monkeypatch):
    common = (
        "debug=fast",
        "trainer.max_steps=6",
        "trainer.ckpt_every_n_steps=100",
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
    )
    signal_at_3 = ("+callbacks.signal._target_=tests.test_slurm_local.SignalAt", "+callbacks.signal.step=3")
    first = run(train_cfg(*common, *signal_at_3))
    assert first.requeued and first.global_step == 3
    assert fake_slurm.read_text().split() == ["requeue", "4242"]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None)  # handler restored after fit

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = run(train_cfg(*common))  # resume=None, yet the restarted job continues
    assert not second.requeued and second.global_step == 6
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert fake_slurm.read_text().count("requeue") == 1
    batches = (tmp_path / "run" / "samples" / "rank0.txt").read_text().splitlines()
    assert len(batches) == 6  # 3 before the signal, 3 after the restart: resumed, not started again


class FakeJob:
    """A submitit job stand-in: done after `polls` checks, or Ctrl-C at the `interrupt_at`-th check."""

    def __init__(self, job_id: str, polls: int, interrupt_at: int | None = None) -> None:
        self.job_id, self.polls, self.interrupt_at = job_id, polls, interrupt_at
        self.checks, self.cancelled = 0, False

    def done(self) -> bool:
        self.checks += 1
        if self.interrupt_at is not None and self.checks >= self.interrupt_at:
            raise KeyboardInterrupt
        return self.checks > self.polls

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def test_a_waiting_sweep_says_why_and_ctrl_c_cancels_its_jobs():
    from llmforge.slurm_sweep import pending_reasons, wait_for

    squeue = "7_0|PENDING|PartitionTimeLimit\n7_1|RUNNING|None\n8_0|PENDING|Resources\n"
    assert pending_reasons(["7_0", "7_1"], squeue) == {"7_0": "PartitionTimeLimit"}
    said: list[str] = []
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    jobs = [FakeJob("7_0", polls=30), FakeJob("7_1", polls=2)]
    wait_for(
        jobs,
        poll_s=60,
        say=said.append,
        reasons=lambda ids: pending_reasons(ids, squeue),
        sleep=sleep,
        clock=lambda: now[0],
        tick_s=5,
    )
    # 30 checks x 5 s = 150 s of waiting: a line at 60 s and at 120 s, not at every check
    assert said == ["slurm: 1 of 2 jobs pending: 7_0 (PartitionTimeLimit)"] * 2
    jobs = [FakeJob("9_0", polls=100, interrupt_at=3), FakeJob("9_1", polls=100)]
    with pytest.raises(KeyboardInterrupt):
        wait_for(jobs, poll_s=60, say=said.append, reasons=lambda ids: {}, sleep=sleep, clock=lambda: now[0])
    assert all(j.cancelled for j in jobs) and said[-1] == "slurm: interrupted: cancelled 9_0, 9_1"


def test_install_wraps_submitits_submission_once():
    submitit = pytest.importorskip("submitit")
    from llmforge import slurm_sweep

    original = submitit.AutoExecutor.map_array
    try:
        assert slurm_sweep.install() and slurm_sweep.install()
        wrapped = submitit.AutoExecutor.map_array
        assert wrapped is not original and getattr(wrapped, "llmforge_waits", False)
    finally:
        submitit.AutoExecutor.map_array = original
