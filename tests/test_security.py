"""A checkpoint never runs code: a pickle payload through every entry point that takes a checkpoint.

Each hostile file carries an object whose unpickling creates a marker file (``__reduce__`` -> ``open``).
Every command runs in its own process, as a user would run it, and must leave no marker, exit non-zero and
say in one line which file it refused.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import run_cli

COMMON = ("debug=fast", "model=tiny", "data.seq_len=32", "data.batch_size=4")


class Payload:
    """Unpickling it opens (creates) ``marker``: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def refused_in_one_line(proc, bad: Path, marker: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    refusals = [line for line in lines if str(bad) in line and "refused" in line]
    assert refusals, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def good_ckpt(tiny_data, tmp_path_factory) -> Path:
    from llmforge.training import run
    from tests.conftest import compose_train

    out = tmp_path_factory.mktemp("good")
    cfg = compose_train(
        [*COMMON, f"data.path={tiny_data}", f"run_dir={out / 'run'}", "trainer.enable_progress_bar=false"]
    )
    return run(cfg).last_checkpoint


def hostile_ckpt(good: Path, bad: Path, marker: Path) -> Path:
    """A real llmforge checkpoint (it would load and work) with one extra entry: the payload."""
    ckpt = torch.load(good, weights_only=True)
    ckpt["extra"] = Payload(marker)
    torch.save(ckpt, bad)
    return bad


def hostile_sharded(directory: Path, marker: Path, where: str) -> Path:
    """A torch.distributed.checkpoint directory as ``strategy=fsdp`` saves it (``.metadata``, ``*.distcp``,
    Lightning's ``meta.pt``), with the payload in ``where``: meta.pt, .metadata or a non-tensor item."""
    import pickle

    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {"model.w": torch.ones(2, 2)}, "optimizer_0": {"param_groups": [{"lr": 0.1}]}}
    if where == "item":
        state["optimizer_0"]["param_groups"][0]["lr"] = Payload(marker)
    dcp.save(state, checkpoint_id=directory)
    meta = {"hyper_parameters": {}, "global_step": 1}
    torch.save({**meta, "extra": Payload(marker)} if where == "meta.pt" else meta, directory / "meta.pt")
    if where == ".metadata":
        (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    assert not marker.exists()
    return directory


@pytest.mark.parametrize("command", ["generate", "evaluate", "export", "init_from", "resume"])
def test_a_hostile_checkpoint_file_is_refused(command, good_ckpt, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    bad = hostile_ckpt(good_ckpt, tmp_path / "bad.ckpt", marker)
    if command == "generate":
        proc = run_cli("llmforge.generate", str(bad), "--prompt", "The", cwd=tmp_path)
    elif command == "evaluate":
        proc = run_cli("llmforge.evaluate", str(bad), f"data={tiny_data}", "--no-progress", cwd=tmp_path)
    elif command == "export":
        proc = run_cli("llmforge.export", str(bad), str(tmp_path / "hf"), "--no-tokenizer", cwd=tmp_path)
    else:
        proc = run_cli("llmforge.train", *COMMON, f"data.path={tiny_data}", f"{command}={bad}", cwd=tmp_path)
    refused_in_one_line(proc, bad, marker)


@pytest.mark.parametrize("where", ["meta.pt", ".metadata", "item"])
def test_a_hostile_sharded_checkpoint_is_refused(where, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    bad = hostile_sharded(tmp_path / "last.ckpt", marker, where)
    named = bad / where if where != "item" else bad
    proc = run_cli("llmforge.consolidate", str(bad), str(tmp_path / "out.ckpt"), cwd=tmp_path)
    refused_in_one_line(proc, named, marker)
    assert not (tmp_path / "out.ckpt").exists()
    proc = run_cli("llmforge.train", *COMMON, f"data.path={tiny_data}", f"resume={bad}", cwd=tmp_path)
    refused_in_one_line(proc, named, marker)


def test_own_sharded_layout_passes_the_checks(tmp_path):
    """The allow-lists take what torch.distributed.checkpoint writes (sizes, dtypes, paths, plain items)."""
    from llmforge.checkpoints import load_dcp, verify_for_resume

    directory = hostile_sharded(tmp_path / "ok.ckpt", tmp_path / "unused", where="none")
    verify_for_resume(directory)
    loaded = load_dcp(directory)
    assert torch.equal(loaded["state_dict"]["model.w"], torch.ones(2, 2))
    assert loaded["optimizer_0"] == {"param_groups": [{"lr": 0.1}]}


class Tamper(L.Callback):
    """Test harness: at the start of ``step`` every step checkpoint saved so far is replaced by a hostile
    one (a shared run dir someone else can write to), so the guard's rollback meets it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            ckpt_dir = Path(trainer.default_root_dir) / "checkpoints"
            marker = Path(trainer.default_root_dir) / "pwned"
            for path in ckpt_dir.glob("step*.ckpt"):
                hostile_ckpt(path, path, marker)


def test_the_guards_rollback_refuses_a_hostile_checkpoint(tiny_data, tmp_path):
    proc = run_cli(
        "llmforge.train",
        *COMMON,
        f"data.path={tiny_data}",
        "trainer.max_steps=4",
        "name=guarded",
        "callbacks.guard.nan_policy=rollback",
        "+callbacks.tamper._target_=tests.test_security.Tamper",
        "+callbacks.tamper.step=3",
        "+callbacks.corrupt._target_=tests.test_stability.CorruptWeights",
        "+callbacks.corrupt.steps=[3]",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "guarded"
    refused_in_one_line(proc, run_dir / "checkpoints" / "step0000002.ckpt", run_dir / "pwned")


def test_lightning_load_from_checkpoint_refuses_it_too(good_ckpt, tmp_path):
    """``CausalLM.load_from_checkpoint`` (the README's way to get the module back) reads with torch's
    default, ``weights_only=True``: the payload does not run there either."""
    from llmforge.objectives.clm import CausalLM

    marker = tmp_path / "pwned"
    bad = hostile_ckpt(good_ckpt, tmp_path / "bad.ckpt", marker)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        CausalLM.load_from_checkpoint(bad, map_location="cpu")
    assert not marker.exists()
