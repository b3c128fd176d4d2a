"""The ``llmforge`` command (``[project.scripts]``): every subcommand is its ``python -m`` module."""

from __future__ import annotations

import sys

import pytest

from llmforge import cli
from tests.conftest import ROOT, run_cli


@pytest.fixture(autouse=True)
def _fresh_hydra():
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()  # a Hydra entry point run in-process leaves its global state set


def test_the_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    assert 'llmforge = "llmforge.cli:main"' in section.splitlines()


# in one process an entry point may already be imported (evaluate imports generate's library parts)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import.*:RuntimeWarning")
@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) >= 3, out
    assert sys.argv[0] != f"llmforge {command}"  # argv is given back


def test_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS), out
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_dispatch_is_python_m(capsys):
    """`llmforge estimate ...` prints what `python -m llmforge.estimate ...` prints, and exits alike."""
    args = ("model=125m", "tokens=1e9", "gpu=a100", "--json")
    assert cli.main(["estimate", *args]) == 0
    ours = capsys.readouterr().out
    theirs = run_cli("llmforge.estimate", *args, cwd=ROOT, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    assert ours == theirs.stdout
    assert cli.main(["estimate", "model=nope"]) == 2
    assert "Could not find 'model/nope'" in capsys.readouterr().err
