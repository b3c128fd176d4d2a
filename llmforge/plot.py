"""python -m llmforge.plot RUN_DIR [--out FILE]: training curves from a run's TensorBoard events, as PNG.

Panels: loss (train and validation), perplexity, gradient norm (before clipping), learning rate, and,
when the run logged them, tokens/s and MFU (`llmforge.curves`).
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args()
    from llmforge.curves import plot

    print(plot(args.run_dir, args.out))


if __name__ == "__main__":
    main()
