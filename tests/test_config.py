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
    precisions = {"32-true", "16-mixed", "bf16-mixed", "bf16-true", "fp8-mixed"}
    assert precisions == {o for g, o in OPTIONS if g == "precision"}
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


# -- issue 12: hostile or impossible values get one line naming the key and the allowed range ------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("hardware.devices=0", "hardware.devices"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches"),
        ("optim.warmup_steps=-5", "optim.warmup_steps"),
        ("optim.min_lr_ratio=5", "optim.min_lr_ratio"),
        ("trainer.ckpt_every_n_steps=0", "trainer.ckpt_every_n_steps"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ],
)
def test_out_of_range_names_key_and_range(override, key):
    cfg = compose_train([override, "run_dir=/tmp/unused"])
    with pytest.raises(ValueError) as err:
        validate(cfg)
    message = str(err.value)
    assert message.startswith(key) and "allowed" in message and "\n" not in message, message


@pytest.mark.parametrize(
    "override",
    ["+callbacks.evil._target_=shutil.copyfile", "logger._target_=builtins.open"],
)
def test_foreign_target_is_refused(override):
    cfg = compose_train([override, "run_dir=/tmp/unused"])
    with pytest.raises(ValueError, match=r"_target_='(shutil.copyfile|builtins.open)' is refused"):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "what"),
    [
        ("+callbacks.evil._target_=torch.load", "function"),  # weights_only=false: a pickle runs code
        ("+callbacks.evil._target_=torch.hub.load", "function"),  # fetches and runs hubconf.py
        ("+callbacks.evil._target_=llmforge.data.shards.write_json_atomic", "function"),
        ("+callbacks.evil._target_=llmforge.callbacks.NoSuchThing", "nothing importable"),
    ],
)
def test_target_must_be_a_class(override, what):
    cfg = compose_train([override, "run_dir=/tmp/unused"])
    with pytest.raises(
        ValueError,
        match=rf"_target_='[\w.]+' is refused: a _target_ must name a class, this is "
        rf"(a )?{what}",
    ) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def test_gpu_without_gpu_is_one_line():
    import torch

    from llmforge.config import check_hardware

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"hardware.accelerator='gpu' but no CUDA GPU"):
        check_hardware(compose_train(["hardware=gpu", "run_dir=/tmp/unused"]))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("precision=32",), "precision is a config group; allowed options: 16-mixed, 32-true"),
        (("trainer.accumulate_grad_batches=0",), "trainer.accumulate_grad_batches=0 is out of range"),
        (
            (
                "+callbacks.evil._target_=shutil.copyfile",
                "+callbacks.evil.src=src",
                "+callbacks.evil.dst=dst",
            ),
            "callbacks.evil._target_='shutil.copyfile' is refused",
        ),
    ],
    ids=["bare-precision", "accumulate-0", "copyfile-target"],
)
def test_cli_refuses_with_one_line(tmp_path, args, expected):
    (tmp_path / "src").write_text("secret")
    proc = run_cli("llmforge.train", *args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / "dst").exists()  # nothing was instantiated


@pytest.fixture
def tiny_module():
    from llmforge.training import build_module

    cfg = compose_train(["run_dir=/tmp/unused", "model=tiny"])
    manifest = {"vocab_size": 512, "special_tokens": {"bos": 1, "eos": 2, "pad": 0, "unk": 3, "mask": 4}}
    return cfg, manifest, build_module(cfg, manifest)


def _lightning_file(module, path):
    import torch

    from llmforge.objectives.base import param_groups

    opt = torch.optim.AdamW(param_groups(module.model, 0.1), lr=1e-3)
    for p in module.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt = {"state_dict": module.state_dict(), "optimizer_states": [opt.state_dict()]}
    torch.save(ckpt, path)
    return ckpt


def test_resume_fits_accepts_own_checkpoint(tiny_module, tmp_path):
    from llmforge.checkpoints import check_resume_fits

    _, _, module = tiny_module
    _lightning_file(module, tmp_path / "ok.ckpt")
    check_resume_fits(module, tmp_path / "ok.ckpt")


def test_wrong_shaped_checkpoint_names_file_and_tensor(tiny_module, tmp_path):
    import torch

    from llmforge.checkpoints import check_resume_fits
    from llmforge.training import build_module

    cfg, manifest, module = tiny_module
    cfg.model.d_model = cfg.model.d_model * 2
    other = build_module(cfg, manifest)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "wide.ckpt")
    with pytest.raises(ValueError, match=r"wide.ckpt: tensor model\.\S+ has shape") as err:
        check_resume_fits(module, tmp_path / "wide.ckpt")
    assert "\n" not in str(err.value)


def test_wrong_shaped_optimizer_state_names_file_and_tensor(tiny_module, tmp_path):
    import torch

    from llmforge.checkpoints import check_resume_fits

    _, _, module = tiny_module
    ckpt = _lightning_file(module, tmp_path / "opt.ckpt")
    state = ckpt["optimizer_states"][0]["state"][0]
    state["exp_avg"] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / "opt.ckpt")
    with pytest.raises(
        ValueError, match=r"opt.ckpt: optimizer state exp_avg of model\.\S+ has shape \(3, 3\)"
    ):
        check_resume_fits(module, tmp_path / "opt.ckpt")


def test_corrupt_checkpoint_names_file(tiny_module, tmp_path):
    from llmforge.checkpoints import check_resume_fits

    _, _, module = tiny_module
    _lightning_file(module, tmp_path / "bad.ckpt")
    data = (tmp_path / "bad.ckpt").read_bytes()
    (tmp_path / "bad.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"bad.ckpt: not a readable checkpoint"):
        check_resume_fits(module, tmp_path / "bad.ckpt")


def test_schemas_are_not_options_of_the_objective_group(tmp_path):
    from hydra.errors import MissingConfigException

    for schema in ("mlm_schema", "denoise_schema"):
        with pytest.raises(MissingConfigException):
            compose_train([f"objective={schema}"])
    with pytest.raises(Exception, match="mask_probb"):  # the knobs are still typed
        compose_train(["objective=mlm", "objective.mask_probb=0.2"])
    proc = run_cli("llmforge.train", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups = proc.stdout.split("== Config ==")[0]
    (line,) = [x for x in groups.splitlines() if x.startswith("objective:")]
    assert line == "objective: clm, denoise, mlm" and "schema" not in groups
