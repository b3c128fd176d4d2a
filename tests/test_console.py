"""What `python -m llmforge.train` prints (llmforge/console.py): the progress bar's fields, the model
line, the commands of the end-of-run hints, and no noise from the dependencies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import clean_env

from llmforge import console


def test_progress_fields_count_steps_and_tokens_and_show_a_readable_lr():
    metrics = {"train/loss": 6.2104, "train/lr": 3e-5, "perf/tokens_per_s": 12345.0, "train/acc": 0.1234}
    description, shown = console.progress_fields(metrics, step=120, max_steps=400, tokens_per_step=4096)
    assert description == "step 120/400  tokens 492k/1.64M"
    assert shown == {"loss": "6.210", "acc": "0.123", "lr": "3.00e-05", "tok/s": "12.3k"}
    _, clm = console.progress_fields({"train/loss": 2.0, "train/lr": 0.0}, 0, 10, None)
    assert clm == {"loss": "2.000", "lr": "0.00e+00"}  # no accuracy where the objective has none


def test_command_names_the_venv_when_it_is_not_activated(tmp_path, monkeypatch):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "tensorboard"):
        (venv_bin / name).write_text("#!/bin/sh\n")
        (venv_bin / name).chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert console.command("python") == ".venv/bin/python"
    assert console.command("tensorboard") == ".venv/bin/tensorboard"
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # activated
    assert console.command("python") == "python" and console.command("tensorboard") == "tensorboard"


def test_train_console_is_calm(tmp_path, tiny_data, monkeypatch):
    """One short mlm run from the command line, with a `srun` on the PATH as on a SLURM login node."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    env = clean_env()
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    env["COLUMNS"] = "200"  # the bar's fields on one line
    proc = subprocess.run(
        [sys.executable, "-m", "llmforge.train", "model=tiny", "objective=mlm", f"data.path={tiny_data}"]
        + ["data.seq_len=32", "data.batch_size=4", "trainer.max_steps=3", "name=calm"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in ("Epoch", "💡", "litlogger", "srun", "Total FLOPs", "Deprecat", "deprecated", "lr: 0.000"):
        assert noise not in out, noise
    assert "model  Encoder (objective=mlm, model=tiny): " in out and "training FLOPs per token" in out
    assert "step 3/3  tokens 384/384" in out  # 4 x 32 tokens per step
    for field in ("loss: ", "acc: ", "lr: ", "tok/s: "):
        assert field in out
    assert " lr: " in out and "e-0" in out.split(" lr: ")[1][:10]  # scientific notation
    monkeypatch.chdir(tmp_path)  # where the command ran
    python = console.command("python")
    assert f"plot         {python} -m llmforge.plot" in out
    assert Path(python).name.startswith("python")
