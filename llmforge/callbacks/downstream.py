"""`DownstreamEval`: lm-eval tasks on the model being trained, every N optimizer steps.

``callbacks.downstream.enabled=true`` (off by default; lm-eval must be installed: ``pip install -e
'.[eval]'``) runs ``callbacks.downstream.tasks`` (default: the shipped offline ``llmforge_stdlib``) at step 0
and every ``every_n_steps`` steps, ``limit`` items per task, and logs ``eval/<task>/<metric>`` and the cost
of the call (``eval/seconds``) to TensorBoard. It runs on rank 0; under FSDP every rank gathers the weights
and runs the same requests (rank 0 logs), as the text samples do. The model is scored in eval mode with
its training weights; the global random generators are not touched, so a run with the callback trains
exactly as one without it. Causal models only (lm-eval's request types).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from llmforge.callbacks.sample_text import _fsdp2_root

log = logging.getLogger(__name__)


class DownstreamEval(L.Callback):
    def __init__(
        self,
        enabled: bool = False,
        tasks: Sequence[str] = ("llmforge_stdlib",),
        every_n_steps: int = 200,
        limit: int | None = None,
        num_fewshot: int | None = None,
        include_path: str | None = None,
        batch_size: int = 32,
        at_start: bool = True,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.downstream.every_n_steps={every_n_steps} must be >= 1")
        if enabled and not tasks:
            raise ValueError("callbacks.downstream.tasks is empty")
        if limit is not None and limit < 1:
            raise ValueError(f"callbacks.downstream.limit={limit} must be >= 1 (or null: every item)")
        self.enabled = enabled
        self.tasks = [str(t) for t in tasks]
        self.every_n_steps, self.limit, self.num_fewshot = every_n_steps, limit, num_fewshot
        self.include_path, self.batch_size, self.at_start = include_path, batch_size, at_start
        self._tokenizer: Any = None
        self._last_step = -1
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ValueError(
                "callbacks.downstream.enabled=true needs lm-eval: pip install -e '.[eval]'"
            ) from None
        if getattr(pl_module.model, "causal", False) is not True:
            raise ValueError(
                "callbacks.downstream scores left-to-right continuations: it needs objective=clm"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and self.at_start and trainer.global_step == 0:
            self.run(trainer, pl_module, 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if not self.enabled or step == self._last_step or step == 0 or step % self.every_n_steps:
            return
        self.run(trainer, pl_module, step)

    # -- the evaluation ----------------------------------------------------------------------------------
    def tokenizer(self, pl_module: L.LightningModule) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            from llmforge.data.shards import TOKENIZER_FILE

            path = Path(getattr(pl_module, "data_info", {}).get("path", "")) / TOKENIZER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"DownstreamEval: no tokenizer at {path}")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    @torch.no_grad()
    def scores(self, pl_module: L.LightningModule) -> dict[str, float]:
        from llmforge.checkpoints import LoadedModel
        from llmforge.downstream.adapter import LlmforgeLM
        from llmforge.downstream.harness import run_tasks, scores

        model = pl_module.model
        model = getattr(model, "_orig_mod", model)
        loaded = LoadedModel(
            model, "clm", dict(pl_module.special_tokens), self.tokenizer(pl_module), dict(pl_module.hparams)
        )
        was_training = model.training
        model.eval()
        quiet = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # lm-eval's per-call progress bars would flood the training log
        try:
            results = run_tasks(
                LlmforgeLM.from_loaded(loaded, self.batch_size),
                self.tasks,
                limit=self.limit,
                num_fewshot=self.num_fewshot,
                include_path=self.include_path,
            )
        finally:
            model.train(was_training)
            if quiet is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = quiet
        return scores(results)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._last_step = step
        sharded = _fsdp2_root(pl_module.model)
        if sharded is None and not trainer.is_global_zero:
            return
        start = time.perf_counter()
        if sharded is not None:
            sharded.unshard()
        try:
            values = self.scores(pl_module)
        finally:
            if sharded is not None:
                sharded.reshard()
        seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return
        metrics = {f"eval/{k}": v for k, v in values.items()} | {"eval/seconds": seconds}
        self.history.append({"step": step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        summary = ", ".join(f"{k[5:]} {v:.4f}" for k, v in metrics.items() if k != "eval/seconds")
        log.info("downstream at step %d (%.1f s): %s", step, seconds, summary)
