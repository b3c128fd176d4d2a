"""python -m llmforge.train [group=option ...] [key=value ...]   (see conf/train.yaml)"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from llmforge.config import register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from llmforge.callbacks import DivergenceError
    from llmforge.training import run  # heavy imports after Hydra has parsed the command line

    # Hydra's handlers (console + train.log) already receive Lightning's messages: drop its own duplicate.
    logging.getLogger("lightning").handlers.clear()

    try:
        result = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:  # the stability guard stopped the run (callbacks.guard)
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(3)
    if result.run_dir and _is_rank_zero():
        print(f"\nrun dir      {result.run_dir}")
        print(f"checkpoint   {result.last_checkpoint}  (step {result.global_step})")
        print(f"tensorboard  tensorboard --logdir {result.run_dir}")
        print(f"plot         python -m llmforge.plot {result.run_dir}")
    return result.metrics.get("val/loss")


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


if __name__ == "__main__":
    main()
