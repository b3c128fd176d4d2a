"""Training curves from a run's TensorBoard events: `read_scalars`, `figure`, `plot` (a PNG).

``python -m llmforge.plot RUN_DIR [--out FILE]`` is the command line.

Panels: loss (train and validation), perplexity, gradient norm (before clipping), learning rate, and,
when the run logged them, tokens/s, MFU and the downstream scores (``eval/<task>/<metric>`` of
``callbacks.downstream``, one panel); for a mixture, validation loss and bits per byte per source and the
sources' epochs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (title, tags, y scale, always drawn): an always-drawn panel of a run without those tags says so
PANELS: tuple[tuple[str, tuple[str, ...], str, bool], ...] = (
    ("loss", ("train/loss", "val/loss"), "linear", True),
    ("perplexity", ("train/ppl", "val/ppl"), "log", True),
    ("gradient norm", ("train/grad_norm",), "log", True),
    ("learning rate", ("train/lr",), "linear", True),
    ("tokens/s", ("perf/tokens_per_s",), "linear", False),
    ("MFU", ("perf/mfu",), "linear", False),
)
TAGS = tuple(tag for _, tags, _, _ in PANELS for tag in tags)


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file under run_dir (later files win on equal steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: sorted(points.items()) for tag, points in series.items()}


def source_panels(scalars: dict) -> list[tuple[str, tuple[str, ...], str, bool]]:
    """A mixture run's panels: validation loss and bits per byte per source (``val/<source>/loss|bpb``,
    with the weighted ``val/loss``), and the sources' epochs (``data/<source>/epoch``)."""
    names = sorted({t.split("/")[1] for t in scalars if t.startswith("val/") and t.count("/") == 2})
    if not names:
        return []
    epochs = tuple(f"data/{n}/epoch" for n in names if f"data/{n}/epoch" in scalars)
    return [
        ("val loss per source", ("val/loss", *(f"val/{n}/loss" for n in names)), "linear", True),
        ("val bits per byte", tuple(f"val/{n}/bpb" for n in names), "linear", True),
        *([("epochs per source", epochs, "linear", True)] if epochs else []),
    ]


def figure(scalars: dict[str, list[tuple[int, float]]]) -> Figure:
    """One panel per entry of `PANELS` (the optional ones only when logged), three to a row."""
    from matplotlib.figure import Figure

    panels = [p for p in PANELS if p[3] or any(tag in scalars for tag in p[1])] + source_panels(scalars)
    downstream = tuple(sorted(t for t in scalars if t.startswith("eval/") and t != "eval/seconds"))
    if downstream:
        panels.append(("downstream (lm-eval)", downstream, "linear", False))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.3 * rows), layout="tight")
    for i, (title, tags, scale, _) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        drawn = False
        for tag in tags:
            points = [(s, v) for s, v in scalars.get(tag, []) if math.isfinite(v)]
            if points:
                steps, values = zip(*points, strict=True)
                marker = "o" if tag.startswith("val") or len(points) == 1 else None
                ax.plot(steps, values, label=tag, marker=marker, markersize=3)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            if scale == "log" and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    return fig


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    scalars = read_scalars(run_dir)
    if "train/loss" not in scalars:
        raise FileNotFoundError(f"no train/loss scalars in TensorBoard events under {run_dir}")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    figure(scalars).savefig(out, dpi=110)
    return out
