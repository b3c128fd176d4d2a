"""notebooks/: each one executes top to bottom on small real inputs; the committed files hold no outputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import nbformat
import pytest

from tests.conftest import ROOT, run_cli

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly pack their boxes".split()


def test_the_three_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == [
        "01_data_funnel.ipynb",
        "02_model_sizing_and_cost.ipynb",
        "03_training_curves.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: run strip_outputs.py"
    assert "parameters" in nb.cells[1].metadata.get("tags", []), "the second cell holds the parameters"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small `python -m llmforge.prepare` output: text files, two dropped by filters, one duplicate."""
    tmp = tmp_path_factory.mktemp("prep")
    (tmp / "in").mkdir()
    for i in range(10):
        rng = random.Random(i)
        (tmp / "in" / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + ".\n")
    (tmp / "in" / "copy.txt").write_text((tmp / "in" / "doc0.txt").read_text())
    (tmp / "in" / "short.txt").write_text("too short.\n")
    (tmp / "in" / "repeated.txt").write_text("the same line again and again\n" * 80)
    out = tmp / "ds"
    proc = run_cli(
        "llmforge.prepare",
        "pipeline=text",
        "progress=false",
        f"input={tmp}/in/*.txt",
        f"output_dir={out}",
        "tokenizer.vocab_size=300",
        "tokenizer.num_sentinels=4",
        "filters.word_count.enabled=true",
        "filters.repetition.enabled=true",
        cwd=tmp,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    from llmforge.training import run
    from tests.conftest import compose_train

    out = tmp_path_factory.mktemp("nb-run") / "run"
    overrides = ["model=tiny", "data.seq_len=32", "data.batch_size=4", "debug=fast", "trainer.max_steps=4"]
    run(compose_train([f"data.path={tiny_data}", f"run_dir={out}", *overrides]))
    return out


def execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    return nb


def text_output(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "") + json.dumps(out.get("data", {}).get("text/markdown", ""))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_data_funnel_notebook(prepared, monkeypatch):
    nb = execute("01_data_funnel.ipynb", {"LLMFORGE_DATA_DIR": str(prepared)}, monkeypatch)
    text = text_output(nb)
    assert "Data-stage funnel" in text  # report.md, displayed
    assert "word_count/too_few_words: 1 sample(s) of 1 dropped" in text and "too short." in text
    assert "repetition/dup_line_frac" in text
    assert "dedup                  10" in text  # 13 read, 11 after the filters, 10 after exact dedup
    assert images(nb) == 1


def test_model_sizing_notebook(monkeypatch):
    # 1b on A100s: with checkpointing the DDP peak is the optimizer step, whose parts differ
    env = {"LLMFORGE_MODEL": "1b", "LLMFORGE_PRESETS": "125m,350m", "LLMFORGE_GPU": "a100"}
    nb = execute("02_model_sizing_and_cost.ipynb", env, monkeypatch)
    text = text_output(nb)
    assert "GPT-3 (175B x 300B tokens): 3.15e+23 FLOPs" in text
    assert "125m" in text and "350m" in text and "lambda $" in text
    assert images(nb) == 1


def test_training_curves_notebook(trained, monkeypatch):
    nb = execute("03_training_curves.ipynb", {"LLMFORGE_RUN_DIR": str(trained)}, monkeypatch)
    text = text_output(nb)
    assert "train/grad_norm" in text and "largest relative difference over 4 points" in text
    assert "0 anomalies" in text
    assert images(nb) == 2  # the curves, loss against tokens
