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

from llmforge.multirun import config_flags, local_processes
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
    assert [p.name for p in jobs] == ["0", "1"]

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
