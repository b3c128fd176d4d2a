"""Hydra multirun with a multi-process strategy on this machine: each job runs once, with its own ranks.

Before llmforge/multirun.py, Lightning's child ranks re-ran the whole sweep (two sweep folders, jobs twice)
and the second job inherited the first job's LOCAL_RANK/WORLD_SIZE/MASTER_PORT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf

from llmforge.multirun import config_flags, format_rows, job_dirname, job_rows, local_processes, swept_keys
from tests.conftest import run_cli


class EnvRecorder(L.Callback):
    """Each rank writes what the distributed launch gave it to `env/rank{r}.json` (used by the test)."""

    def on_fit_start(self, trainer, pl_module):
        out = Path(trainer.default_root_dir) / "env"
        out.mkdir(parents=True, exist_ok=True)
        keys = ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
        record = {k: os.environ.get(k) for k in keys} | {"pid": os.getpid(), "ppid": os.getppid()}
        record["global_rank"] = trainer.global_rank
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_local_processes_counts_devices():
    assert local_processes("cpu", 2) == 2
    assert local_processes("cpu", "2") == 2
    assert local_processes("cpu", "auto") == 1
    assert local_processes("gpu", [0, 3]) == 2
    assert local_processes("gpu", "0,1,2") == 3


def test_config_flags_keeps_only_config_selection():
    argv = ["-m", "--config-name", "train", "optim.lr=1e-3,3e-4", "-cp=/x/conf", "strategy=ddp"]
    assert config_flags(argv) == ["--config-name", "train", "-cp=/x/conf"]


def test_job_folders_are_named_by_the_swept_overrides():
    argv = ["-m", "optim.lr=1e-3,3e-4", "model=choice(tiny,mini)", "data.path=/x/y", "+a.b=[1,2]", "name=s"]
    keys = swept_keys(argv)
    assert keys == ["optim.lr", "model"]  # a list value is not a sweep
    overrides = ["optim.lr=0.001", "model=tiny", "data.path=/x/y", "+a.b=[1,2]", "name=s"]
    assert job_dirname(3, overrides, keys) == "3_optim.lr=0.001,model=tiny"
    assert job_dirname(0, ["data.path=/x/y"], ["data.path"]) == "0_data.path=_x_y"  # one folder, not a tree
    assert job_dirname(7, overrides, []) == "7"


def test_local_sweep_names_its_folders_and_ends_with_a_table(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "-m",
        "optim.lr=1e-3,3e-4",
        "debug=fast",
        "trainer.max_steps=2",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "name=sweep",
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    sweep = tmp_path / "runs" / "sweep" / "multirun"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_optim.lr=0.001", "1_optim.lr=0.0003"]
    rows = job_rows(sweep)
    assert [(r["job"], r["overrides"], r["step"]) for r in rows] == [
        (0, "optim.lr=0.001", 2),
        (1, "optim.lr=0.0003", 2),
    ]
    table = out[out.index(f"sweep {Path('runs/sweep/multirun')}") :].splitlines()
    assert table[1].split() == ["job", "overrides", "step", "train/loss", "val/loss", "checkpoint"]
    assert table[2].split()[:3] == ["0", "optim.lr=0.001", "2"] and table[2].endswith("last.ckpt")
    assert format_rows(rows).splitlines()[1:] == table[2:4]
    assert all(r["val/loss"] > 0 and r["train/loss"] > 0 for r in rows)


@pytest.mark.slow
def test_multirun_ddp_runs_each_job_once_with_its_own_ranks(tmp_path, tiny_data):
    proc = run_cli(
        "llmforge.train",
        "-m",
        "optim.lr=1e-3,3e-4",
        "strategy=ddp",
        "hardware.devices=2",
        "debug=fast",
        "trainer.max_steps=3",
        "model=tiny",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "data.batch_size=2",
        "name=sweep",
        "hydra.sweep.dir=sweeps/${now:%H-%M-%S-%f}",  # a re-run sweep would make a second folder
        "+callbacks.samples._target_=llmforge.callbacks.SampleIndexRecorder",
        "+callbacks.env._target_=tests.test_multirun.EnvRecorder",
        cwd=tmp_path,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("Launching 2 jobs") == 1, out[-4000:]
    sweeps = list((tmp_path / "sweeps").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_optim.lr=0.001", "1_optim.lr=0.0003"]  # named by what varies

    envs = []
    for job, lr in zip(jobs, (1e-3, 3e-4), strict=True):
        manifest = json.loads((job / "run_manifest.json").read_text())
        assert manifest["world_size"] == 2
        assert OmegaConf.load(job / "config.yaml").optim.lr == lr  # the job's own overrides
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((job / "result.json").read_text())["global_step"] == 3
        samples = [(job / "samples" / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)]
        assert [len(s) for s in samples] == [3, 3]  # both ranks trained every step of this job, once
        env = [json.loads((job / "env" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert [e["global_rank"] for e in env] == [0, 1]
        assert [e["LOCAL_RANK"] for e in env] == ["0", "1"]
        assert {e["WORLD_SIZE"] for e in env} == {"2"}
        assert env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"]
        assert env[1]["ppid"] == env[0]["pid"]  # rank 1 was started by this job's rank 0
        envs.append(env)
    # the second job's ranks are new processes on a port of their own, not the first job's
    assert {e["pid"] for e in envs[0]}.isdisjoint(e["pid"] for e in envs[1])
    assert envs[0][0]["MASTER_PORT"] != envs[1][0]["MASTER_PORT"]
    assert envs[0][0]["ppid"] == envs[1][0]["ppid"]  # both started by the one sweep process
