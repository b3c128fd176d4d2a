"""A run's files survive crashes, full disks and a second run (issue 12, items 4-7).

- ``resume=auto`` resumes from the newest checkpoint that loads, says which newer ones it skipped and why,
  and starts over only when there is no checkpoint at all.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from llmforge.training import resolve_resume


def _save(path: Path, step: int, age: float) -> Path:
    """A loadable stand-in for a Lightning checkpoint, ``age`` seconds old."""
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, path)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def _auto(ckpt_dir: Path) -> str | None:
    return resolve_resume(OmegaConf.create({"resume": "auto"}), ckpt_dir)


def test_killed_before_first_last_ckpt_resumes_from_newest_step(tmp_path):
    _save(tmp_path / "step0000002.ckpt", 2, age=20)
    newest = _save(tmp_path / "step0000004.ckpt", 4, age=10)
    assert _auto(tmp_path) == str(newest)


def test_corrupt_last_is_skipped_with_a_line(tmp_path, caplog):
    _save(tmp_path / "step0000002.ckpt", 2, age=30)
    good = _save(tmp_path / "step0000004.ckpt", 4, age=20)
    (tmp_path / "last.ckpt").write_bytes(good.read_bytes()[:100])  # truncated: the newest file
    with caplog.at_level(logging.WARNING, logger="llmforge.training"):
        assert _auto(tmp_path) == str(good)
    text = caplog.text
    assert "skipping" in text and "last.ckpt" in text and "not a readable checkpoint" in text, text
    assert f"resuming from {good}" in text


def test_newest_wins_over_stale_last(tmp_path):
    _save(tmp_path / "last.ckpt", 2, age=30)
    newest = _save(tmp_path / "step0000004.ckpt", 4, age=10)  # saved, killed before last.ckpt followed
    assert _auto(tmp_path) == str(newest)


def test_fresh_start_only_without_checkpoints(tmp_path):
    assert _auto(tmp_path / "missing") is None
    assert _auto(tmp_path) is None
    (tmp_path / "last.consolidated.ckpt").write_bytes(b"not a training checkpoint")
    assert _auto(tmp_path) is None


def test_all_damaged_stops_instead_of_starting_over(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"garbage")
    (tmp_path / "step0000002.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="no checkpoint in .* loads"):
        _auto(tmp_path)


def test_hostile_last_is_skipped_and_never_run(tmp_path, caplog):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    good = _save(tmp_path / "step0000002.ckpt", 2, age=30)
    with open(tmp_path / "last.ckpt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with caplog.at_level(logging.WARNING, logger="llmforge.training"):
        assert _auto(tmp_path) == str(good)
    assert "last.ckpt: refused to load" in caplog.text
    assert not marker.exists()


def test_requeued_job_goes_on_from_its_own_newest_checkpoint(tmp_path, monkeypatch):
    """SLURM requeued the job: its own newest checkpoint wins over the `resume=<file>` it was started
    with (that file is where the first attempt began, not where it stopped)."""
    start = _save(tmp_path / "pretrained.ckpt", 100, age=60)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    cfg = OmegaConf.create({"resume": str(start)})
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_resume(cfg, ckpt_dir) == str(start)  # requeued before anything was saved
    newest = _save(ckpt_dir / "step0000120.ckpt", 120, age=10)  # no last.ckpt: killed right after it
    assert resolve_resume(cfg, ckpt_dir) == str(newest)
    assert _auto(ckpt_dir) == str(newest)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resolve_resume(cfg, ckpt_dir) == str(start)  # a fresh submission does what it is told


# -- item 6: one run per run dir -------------------------------------------------------------------------
def test_second_run_into_a_locked_run_dir_is_refused(tmp_path, tiny_data):
    from llmforge.training import run_dir_lock
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    args = [f"data.path={tiny_data}", f"run_dir={run_dir}", "debug=fast", "trainer.enable_progress_bar=false"]
    with run_dir_lock(run_dir):  # this process is the first run: the CLI is the second
        proc = run_cli("llmforge.train", *args, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    expected = f"{run_dir} is in use by another run (pid {os.getpid()}"
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (run_dir / "checkpoints").exists()


def test_lock_is_released_after_a_run(tmp_path):
    from llmforge.training import run_dir_lock

    with run_dir_lock(tmp_path), pytest.raises(FileExistsError, match="in use by another run"):
        with run_dir_lock(tmp_path):  # a second open of the lock file: refused even in one process
            pass
    with run_dir_lock(tmp_path):  # released when the first run ended
        pass


# -- item 5: a full disk leaves every checkpoint loadable --------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A real filesystem of a few MB (tmpfs; needs root): ENOSPC as a full disk gives it."""
    import subprocess

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{size}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or 'not root'})")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_full_disk_keeps_previous_checkpoint(small_tmpfs):
    from llmforge.checkpoints import CheckpointSaveError, atomic_checkpoint_io, safe_load

    disk = small_tmpfs("1m")
    io = atomic_checkpoint_io()
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, disk / "last.ckpt")
    with pytest.raises(CheckpointSaveError, match=r"last.ckpt: could not be saved .*previous checkpoint"):
        io.save_checkpoint({"step": 2, "w": torch.ones(400_000)}, disk / "last.ckpt")  # 1.6 MB
    assert safe_load(disk / "last.ckpt")["step"] == 1
    assert [p.name for p in disk.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_failed_write_keeps_previous_checkpoint(tmp_path):
    """The same without root (no tmpfs): the disk fills up halfway through the new file."""
    import errno

    from llmforge.checkpoints import CheckpointSaveError, atomic_write, safe_load

    path = tmp_path / "last.ckpt"
    atomic_write(path, lambda f: torch.save({"step": 1}, f))

    def fill_up(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(
        CheckpointSaveError, match=r"last.ckpt: could not be saved \(No space left on device\)"
    ):
        atomic_write(path, fill_up)
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_run_on_a_full_disk_stops_with_one_line(small_tmpfs, tiny_data):
    from llmforge.checkpoints import safe_load
    from tests.conftest import run_cli

    disk = small_tmpfs("6m")  # step 0 (0.7 MB) + step 1 and last.ckpt (2.1 MB each) fit; step 2 does not
    args = [f"data.path={tiny_data}", f"run_dir={disk / 'run'}", "debug=fast", "trainer.max_steps=6"]
    proc = run_cli("llmforge.train", *args, "data.seq_len=32", cwd=disk.parent, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "could not be saved (No space left on device)" in error[0], proc.stderr
    ckpts = sorted((disk / "run" / "checkpoints").iterdir())
    assert "last.ckpt" in [p.name for p in ckpts], ckpts
    for path in ckpts:  # every file there loads: none truncated, no temporary file left
        assert path.suffix == ".ckpt", path
        safe_load(path)


# -- item 7: everything of a run inside its run dir --------------------------------------------------------
@pytest.mark.slow
def test_hydra_files_and_log_follow_run_dir(tmp_path, tiny_data):
    from tests.conftest import run_cli

    run_dir = tmp_path / "elsewhere" / "myrun"
    args = [f"data.path={tiny_data}", f"run_dir={run_dir}", "debug=fast", "data.seq_len=32", "name=same"]
    proc = run_cli("llmforge.train", *args, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert (run_dir / "train.log").stat().st_size > 0
    assert not (tmp_path / "runs").exists()  # nothing of it under <cwd>/runs/<name>/
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_hydra_run_dir_alone_moves_the_whole_run(tmp_path):
    """Hydra's own ``hydra.run.dir=`` keeps meaning the run's directory: the lock (and the checkpoints
    that would follow) go there, not to ``runs/<name>``. The run stops early on a missing dataset."""
    from tests.conftest import run_cli

    where = tmp_path / "hydra-dir"
    proc = run_cli("llmforge.train", f"hydra.run.dir={where}", f"data.path={tmp_path / 'none'}", cwd=tmp_path)
    assert proc.returncode == 2 and "manifest.json missing" in proc.stderr, proc.stderr
    assert (where / "run.lock").is_file() and (where / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()


def test_default_run_dir_is_absolute_runs_name(tmp_path, monkeypatch):
    from tests.conftest import compose_train

    monkeypatch.chdir(tmp_path)
    cfg = compose_train(["name=abc"])
    assert cfg.run_dir == str(tmp_path / "runs" / "abc")


def test_compile_caches_are_under_llmforge_cache(monkeypatch, tmp_path):
    from llmforge.training import compile_caches

    monkeypatch.setenv("LLMFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    compile_caches()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "torch-compile" / "triton")


def test_interrupted_save_temp_files_are_removed(tmp_path):
    from llmforge.checkpoints import remove_interrupted_writes

    keep = _save(tmp_path / "step0000002.ckpt", 2, age=1)
    (tmp_path / ".last.ckpt.tmp-1234").write_bytes(b"half")
    (tmp_path / "last.ckpt.tmp").write_bytes(b"half")
    removed = remove_interrupted_writes(tmp_path)
    assert sorted(p.name for p in removed) == [".last.ckpt.tmp-1234", "last.ckpt.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == [keep.name]


# -- item 2: a single-node multi-process run listens on loopback only ---------------------------------------
def listening_addresses() -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of this process's listening TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


class RecordListeners(L.Callback):
    """Writes each rank's listening addresses once training runs (process group and store up)."""

    def on_train_start(self, trainer, pl_module):
        import json

        out = Path(trainer.default_root_dir) / f"listeners.{trainer.global_rank}.json"
        out.write_text(json.dumps(listening_addresses()))


@pytest.mark.slow
def test_single_node_ddp_listens_on_loopback_only(ddp_run):
    """The 2-rank DDP run of tests/conftest.py (`ddp_run`: run_dir= given, outside its working directory)."""
    import json

    run_dir = ddp_run.run_dir
    rank0 = json.loads((run_dir / "listeners.0.json").read_text())
    rank1 = json.loads((run_dir / "listeners.1.json").read_text())
    assert rank0, "rank 0 hosts the rendezvous store: it listens"
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert set(rank0) | set(rank1) <= loopback, (rank0, rank1)
    assert (run_dir / "train_ddp_process_1.log").is_file()  # item 7: rank 1's log is in the run dir too
    assert not (ddp_run.cwd / "runs").exists()


def test_loopback_rendezvous_restores_the_environment(monkeypatch):
    from llmforge.training import loopback_rendezvous
    from tests.conftest import compose_train

    for name in (
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_USE_AGENT_STORE",
        "GLOO_SOCKET_IFNAME",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    cfg = compose_train(["run_dir=/tmp/unused", "strategy=ddp", "hardware.devices=2"])
    with loopback_rendezvous(cfg) as applied:
        assert applied and os.environ["MASTER_ADDR"] == "127.0.0.1"
        assert listening_addresses() == ["0100007F"]
    assert "MASTER_ADDR" not in os.environ and "TORCHELASTIC_USE_AGENT_STORE" not in os.environ
    with loopback_rendezvous(
        compose_train(["run_dir=/tmp/unused", "hardware.num_nodes=2", "strategy=ddp"])
    ) as on:
        assert not on  # other machines must reach rank 0
    with loopback_rendezvous(compose_train(["run_dir=/tmp/unused", "hardware.devices=1"])) as on:
        assert not on  # one process: nothing to rendezvous
    with loopback_rendezvous(compose_train(["run_dir=/tmp/unused", "hardware.devices=2"])) as on:
        assert on  # strategy=auto with 2 devices is Lightning's DDP: loopback too
