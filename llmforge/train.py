"""python -m llmforge.train [group=option ...] [key=value ...]   (see conf/train.yaml)"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmforge.config import check_group_overrides, register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from llmforge import console, multirun, slurm

    if multirun.needs_own_processes(cfg.hardware):  # local sweep, several ranks: see llmforge/multirun.py
        return multirun.run_job_in_own_processes()
    from llmforge.callbacks import DivergenceError
    from llmforge.training import run  # heavy imports after Hydra has parsed the command line

    # Hydra's handlers (console + train.log) already receive Lightning's messages: drop its own duplicate.
    logging.getLogger("lightning").handlers.clear()
    console.quiet_dependencies()  # Lightning's tip, the srun warning, dependencies' deprecation warnings

    try:
        result = run(cfg)
    except (ValueError, OSError, KeyError) as err:  # OSError: a full disk at a checkpoint, a taken run dir
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as err:  # the stability guard stopped the run (callbacks.guard)
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(3)
    if result.requeued:  # exit, not return: submitit must not record this attempt as the job's result
        print(f"requeued at step {result.global_step}: SLURM restarts the job from {result.last_checkpoint}")
        sys.exit(slurm.REQUEUED_EXIT_CODE)
    if result.run_dir and _is_rank_zero():
        multirun.write_result(result.run_dir, result.global_step, result.last_checkpoint, result.metrics)
        print(f"\nrun dir      {result.run_dir}")
        print(f"checkpoint   {result.last_checkpoint}  (step {result.global_step})")
        print(f"tensorboard  {console.command('tensorboard')} --logdir {result.run_dir}")
        print(f"plot         {console.command('python')} -m llmforge.plot {result.run_dir}")
    return result.metrics.get("val/loss")


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0  # set by the strategy (local ranks, torchrun, SLURM tasks)


if __name__ == "__main__":
    try:  # `precision=32` would reach Hydra as an integer group choice and fail with a traceback
        check_group_overrides(sys.argv[1:], Path(__file__).resolve().parent.parent / "conf")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
