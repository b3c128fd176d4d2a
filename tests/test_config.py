"""Every option of every config group composes; bad keys, types and choices give errors that name the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from llmforge.config import validate
from llmforge.models.transformer import TransformerConfig
from tests.conftest import CONF, compose_train, run_cli

PREPARE_GROUPS = ("pipeline", "executor")  # composed by prepare.yaml, not train.yaml
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in PREPARE_GROUPS)
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    for group in (
        "model",
        "objective",
        "data",
        "precision",
        "strategy",
        "hardware",
        "optim",
        "trainer",
        "logger",
        "callbacks",
        "experiment",
        "debug",
    ):
        assert group in GROUPS, group
    assert {"tiny", "125m", "350m", "1b", "3b", "7b"} <= {o for g, o in OPTIONS if g == "model"}
    assert {"32-true", "16-mixed", "bf16-mixed", "bf16-true"} == {o for g, o in OPTIONS if g == "precision"}
    assert {"auto", "ddp", "fsdp"} == {o for g, o in OPTIONS if g == "strategy"}
    assert {"cpu", "gpu", "gpu8", "multinode"} == {o for g, o in OPTIONS if g == "hardware"}


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes(group, option):
    overrides = [f"{group}={option}", "run_dir=/tmp/unused"]
    if group == "precision" and option == "16-mixed":
        overrides.append("hardware=gpu")  # fp16 autocast needs a GPU
    cfg = compose_train(overrides)
    validate(cfg)
    model = dict(cfg.model)
    model["vocab_size"] = model["vocab_size"] or 512
    TransformerConfig(**model)
    assert cfg.objective._target_.startswith("llmforge.")


def test_defaults_compose_to_cpu_run():
    cfg = compose_train(["run_dir=/tmp/unused"])
    validate(cfg)
    assert cfg.hardware.accelerator == "cpu" and cfg.model.name == "tiny" and cfg.objective.name == "clm"
    assert cfg.experiment if "experiment" in cfg else True  # experiment: null adds no key


def test_misspelt_key_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["optim.lrr=0.1"])
    assert "optim.lrr" in str(err.value)


def test_wrong_type_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value)
    assert isinstance(err.value.__cause__, ValidationError | ConfigKeyError)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("strategy.name=zero3", "strategy.name"),
        ("precision.value=fp8", "precision.value"),
        ("optim.schedule=step", "optim.schedule"),
        ("hardware.accelerator=tpu", "hardware.accelerator"),
    ],
)
def test_bad_choice_names_key_and_allowed_values(override, key):
    cfg = compose_train([override, "run_dir=/tmp/unused"])
    with pytest.raises(ValueError) as err:
        validate(cfg)
    assert key in str(err.value) and "is not one of" in str(err.value)


def test_fp16_on_cpu_is_refused():
    cfg = compose_train(["precision=16-mixed", "run_dir=/tmp/unused"])
    with pytest.raises(ValueError, match="16-mixed"):
        validate(cfg)


def test_cli_error_first_line_names_key(tmp_path):
    proc = run_cli("llmforge.train", "optim.lrr=0.1", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert "optim.lrr" in first, proc.stderr


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, f.stem) for g in PREPARE_GROUPS for f in sorted((CONF / g).glob("*.yaml"))],
)
def test_prepare_option_composes(group, option):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="prepare", overrides=[f"{group}={option}"])
    assert cfg.executor.name in ("local", "slurm", "ray") and cfg.tokenizer.vocab_size > 0
    from llmforge.prep.filters import build_filters

    build_filters(cfg.filters)


def test_prepare_misspelt_key_is_named():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), pytest.raises(Exception) as err:
        compose(config_name="prepare", overrides=["dedup.treshold=0.5"])
    assert "dedup.treshold" in str(err.value)
