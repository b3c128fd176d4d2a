"""python -m llmforge.plot RUN_DIR [--out FILE]: training curves from a run's TensorBoard events, as PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

TAGS = ("train/loss", "val/loss", "train/ppl", "train/lr", "perf/tokens_per_s")


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


def plot(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    if "train/loss" not in scalars:
        raise FileNotFoundError(f"no train/loss scalars in TensorBoard events under {run_dir}")
    panels = [
        ("loss", ["train/loss", "val/loss"]),
        ("perplexity", ["train/ppl"]),
        ("learning rate", ["train/lr"]),
        ("tokens/s", ["perf/tokens_per_s"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, tags) in zip(axes, panels, strict=True):
        for tag in tags:
            if tag in scalars:
                steps, values = zip(*scalars[tag], strict=True)
                ax.plot(steps, values, label=tag, marker="o" if tag.startswith("val") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "perplexity":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args()
    print(plot(args.run_dir, args.out))


if __name__ == "__main__":
    main()
