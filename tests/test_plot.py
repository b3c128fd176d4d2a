"""`python -m llmforge.plot`: the curves of a real run's TensorBoard events."""

from __future__ import annotations

import pytest

from llmforge.curves import figure, plot, read_scalars
from llmforge.training import run
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    from tests.conftest import compose_train

    out = tmp_path_factory.mktemp("plot") / "run"
    cfg = compose_train(
        [
            f"data.path={tiny_data}",
            f"run_dir={out}",
            "model=tiny",
            "data.seq_len=32",
            "data.batch_size=4",
            "debug=fast",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
        ]
    )
    run(cfg)
    return out


def test_panels_draw_the_logged_curves(run_dir):
    scalars = read_scalars(run_dir)
    fig = figure(scalars)
    axes = {ax.get_title(): ax for ax in fig.axes}
    # on a CPU there is no MFU: that panel is left out, the required four and tokens/s are drawn
    assert list(axes) == ["loss", "perplexity", "gradient norm", "learning rate", "tokens/s"]
    expected = {
        "loss": ["train/loss", "val/loss"],
        "perplexity": ["train/ppl", "val/ppl"],
        "gradient norm": ["train/grad_norm"],
        "learning rate": ["train/lr"],
        "tokens/s": ["perf/tokens_per_s"],
    }
    for title, tags in expected.items():
        lines = {line.get_label(): line for line in axes[title].get_lines()}
        assert sorted(lines) == sorted(tags), title
        for tag in tags:
            steps, values = zip(*scalars[tag], strict=True)
            assert list(lines[tag].get_xdata()) == list(steps)
            assert list(lines[tag].get_ydata()) == pytest.approx(list(values))
    assert len(scalars["train/grad_norm"]) == 4 and len(scalars["val/loss"]) == 2


def test_missing_curves_are_said_and_non_finite_points_skipped():
    fig = figure({"train/loss": [(0, 5.0), (1, float("nan")), (2, 4.0)]})
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["loss", "perplexity", "gradient norm", "learning rate"]
    assert list(axes["loss"].get_lines()[0].get_xdata()) == [0, 2]
    assert [t.get_text() for t in axes["gradient norm"].texts] == ["not logged"]


def test_cli_writes_the_png(run_dir, tmp_path):
    proc = run_cli("llmforge.plot", str(run_dir), "--out", str(tmp_path / "c.png"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = tmp_path / "c.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert plot(run_dir) == run_dir / "curves.png"
    with pytest.raises(FileNotFoundError, match="no train/loss"):
        plot(tmp_path)


def test_downstream_scores_get_their_own_panel():
    from llmforge.curves import figure

    scalars = {
        "train/loss": [(0, 3.0), (1, 2.0)],
        "eval/llmforge_stdlib/acc": [(0, 0.25), (100, 0.4)],
        "eval/seconds": [(0, 2.0)],
    }
    axes = {ax.get_title(): ax for ax in figure(scalars).axes}
    labels = [line.get_label() for line in axes["downstream (lm-eval)"].get_lines()]
    assert labels == ["eval/llmforge_stdlib/acc"]
