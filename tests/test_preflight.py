"""The memory pre-flight (llmforge/preflight.py): the decision on fake free-memory figures, one in-process
refusal before the model is built, and one refusal through the command line (a model no machine holds)."""

from __future__ import annotations

import re

import pytest
from conftest import compose_train, run_cli

from llmforge import preflight
from llmforge.estimate.memory import GB


def plan_of(*overrides: str) -> preflight.Plan:
    return preflight.plan_from_config(compose_train(["data.seq_len=256", *overrides]), vocab_size=8192)


def test_the_decision_compares_the_estimate_with_the_free_memory():
    plan = plan_of("model=1b", "objective=mlm", "strategy=fsdp")
    est = preflight.peak(plan).total
    assert est / GB == pytest.approx(22.0, abs=0.1)  # the figure `python -m llmforge.estimate` gives
    assert preflight.check(plan, free_bytes=est * 1.01) is None
    message = preflight.check(plan, free_bytes=20 * GB)
    assert message is not None and "\n" not in message
    assert "22.0 GB per device" in message and "20.0 GB of available RAM" in message
    # what to change, each priced, and the way out
    for advice in ("strategy.activation_checkpointing=true (", "data.batch_size=4", "precision=bf16-true ("):
        assert advice in message
    assert "a smaller model" in message and "trainer.skip_memory_check=true" in message
    priced = [float(x) for x in re.findall(r"\((\d+\.\d) GB\)", message)]
    assert priced and all(x < 22.0 for x in priced)


def test_cpu_ranks_of_a_node_share_its_ram_gpus_do_not():
    cpu = plan_of("model=125m", "strategy=ddp", "hardware.devices=2")
    per_rank = preflight.peak(cpu).total
    assert preflight.check(cpu, free_bytes=per_rank * 1.5) is not None  # two ranks need twice
    assert preflight.check(cpu, free_bytes=per_rank * 2.01) is None
    gpu = plan_of("model=125m", "strategy=ddp", "hardware=gpu", "hardware.devices=2")
    assert preflight.check(gpu, free_bytes=preflight.peak(gpu).total * 1.01) is None


def test_fsdp_over_more_gpus_is_offered_on_gpus():
    plan = plan_of("model=7b", "hardware=gpu", "precision=bf16-mixed", "strategy=fsdp")
    message = preflight.check(plan, free_bytes=40 * GB)
    assert message is not None and "strategy=fsdp hardware.devices=2" in message
    assert "free GPU memory per device" in message


def test_available_ram_is_a_positive_figure():
    assert 0 < preflight.available_ram() < float("inf")


def test_train_stops_before_building_the_model(train_cfg, monkeypatch):
    from llmforge import training

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(training, "build_module", never)
    monkeypatch.setattr(preflight, "free_bytes", lambda plan: 1e6)  # a 1 MB machine
    with pytest.raises(preflight.MemoryCheckError, match=r"more than the 1\.0 MB of available RAM"):
        training.run(train_cfg())


def test_skip_memory_check_skips_it(train_cfg):
    cfg = train_cfg("trainer.skip_memory_check=true")
    preflight.check_run(cfg, vocab_size=512, free=lambda plan: 1.0)  # no error
    with pytest.raises(preflight.MemoryCheckError):
        preflight.check_run(train_cfg(), vocab_size=512, free=lambda plan: 1.0)


def test_command_line_refuses_a_model_too_big_with_one_line(tmp_path, tiny_data):
    # 320 layers of 7b width: ~67B parameters, ~1 TB of model states in fp32: no test machine has it free
    proc = run_cli(
        "llmforge.train",
        "model=7b",
        "model.n_layers=320",
        f"data.path={tiny_data}",
        "data.seq_len=32",
        "name=too-big",
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: memory: this run needs about ") and "GB of available RAM" in lines[-1]
    assert not (tmp_path / "runs" / "too-big" / "checkpoints").exists()
