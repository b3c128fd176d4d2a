"""Read what the model writes while it trains: `SampleText`, a callback that logs samples to TensorBoard.

Every ``every_n_steps`` optimizer steps, the model answers a few fixed prompts, by objective:

- ``clm``: continues each prompt (greedy by default; ``temperature``/``top_k``/``top_p`` sample, seeded);
- ``mlm``: fills each ``<mask>`` of the prompt (the ``mask_top_k`` candidates with their probabilities);
  a prompt without ``<mask>`` gets its last word replaced by one;
- ``denoise``: fills the sentinels ``<extra_id_i>``; a prompt without one gets its last word replaced by
  ``<extra_id_0>``.

The text goes to TensorBoard (``add_text``, tag ``samples/<objective>``: the Text tab) and to the log.
The callback runs on rank 0 only, under ``torch.no_grad``, puts the model back in the mode it was in, and
draws only from its own seeded ``torch.Generator``: the training RNG and data stream are untouched, so a
run with it is bitwise the run without it. Under ``strategy=fsdp`` (FSDP2) the weights are sharded: every
rank gathers them (``unshard``), runs the same deterministic generation (so the collectives match), and
rank 0 writes; then they are sharded again.

Configured in ``conf/callbacks/default.yaml`` (key ``sample_text``); e.g.
``callbacks.sample_text.every_n_steps=100 'callbacks.sample_text.prompts=[The,Return the]'``, or
``callbacks.sample_text=null`` to turn it off.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from llmforge.checkpoints import LoadedModel
from llmforge.inference import Sampling, fill_mask, fill_spans, generate_text
from llmforge.models.transformer import Encoder, EncoderDecoder, Transformer

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = ("The", "This module provides", "Return the")


def objective_of_model(model: torch.nn.Module) -> str:
    if isinstance(model, EncoderDecoder):
        return "denoise"
    if isinstance(model, Encoder):
        return "mlm"
    if isinstance(model, Transformer):
        return "clm"
    raise TypeError(f"SampleText does not know how to sample from {type(model).__name__}")


def with_placeholder(prompt: str, placeholder: str) -> str:
    """The prompt with its last word replaced by ``placeholder`` (unless it already holds one)."""
    if placeholder in prompt or "<extra_id_" in prompt and placeholder.startswith("<extra_id_"):
        return prompt
    head, sep, _ = prompt.rstrip().rpartition(" ")
    return (head if sep else prompt) + placeholder


class SampleText(L.Callback):
    def __init__(
        self,
        prompts: list[str] | tuple[str, ...] = DEFAULT_PROMPTS,
        every_n_steps: int = 200,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        mask_top_k: int = 3,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.sample_text.every_n_steps={every_n_steps} must be >= 1")
        if not prompts:
            raise ValueError("callbacks.sample_text.prompts is empty")
        self.prompts = [str(p) for p in prompts]
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.sampling = Sampling(temperature, top_k, top_p)
        self.seed, self.mask_top_k = seed, mask_top_k
        self._tokenizer: Any = None
        self._last_step = -1

    # -- what it writes -------------------------------------------------------------------------------
    def tokenizer(self, pl_module: L.LightningModule) -> Any:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            from llmforge.data.shards import TOKENIZER_FILE

            path = Path(getattr(pl_module, "data_info", {}).get("path", "")) / TOKENIZER_FILE
            if not path.is_file():
                raise FileNotFoundError(f"SampleText: no tokenizer at {path}")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    @torch.no_grad()
    def samples(self, pl_module: L.LightningModule) -> tuple[str, list[dict]]:
        """(objective, one result dict per prompt), as `llmforge.generate` gives them."""
        model = pl_module.model
        model = getattr(model, "_orig_mod", model)  # torch.compile
        objective = objective_of_model(model)
        lm = LoadedModel(
            model,
            objective,
            dict(pl_module.special_tokens),
            self.tokenizer(pl_module),
            dict(pl_module.hparams),
        )
        was_training = model.training
        model.eval()
        try:
            if objective == "clm":
                results = generate_text(
                    lm, self.prompts, self.max_new_tokens, sampling=self.sampling, seed=self.seed
                )
            elif objective == "mlm":
                results = [
                    fill_mask(lm, with_placeholder(p, "<mask>"), self.mask_top_k) for p in self.prompts
                ]
            else:
                results = [
                    fill_spans(
                        lm,
                        with_placeholder(p, "<extra_id_0>"),
                        self.max_new_tokens,
                        sampling=self.sampling,
                        seed=self.seed,
                    )
                    for p in self.prompts
                ]
        finally:
            model.train(was_training)
        return objective, results

    @staticmethod
    def markdown(objective: str, results: list[dict]) -> str:
        """TensorBoard's Text tab renders markdown: prompt in bold, model output in a code span."""
        lines = []
        for r in results:
            if objective == "clm":
                lines.append(f"**{_md(r['prompt'])}** {_code(r['completion'])}")
            elif objective == "mlm":
                cands = "; ".join(
                    ", ".join(f"{_code(c['token'])} {c['prob']:.3f}" for c in mask) for mask in r["masks"]
                )
                lines.append(f"**{_md(r['prompt'])}** &rarr; {_code(r['filled'])} ({cands})")
            else:
                spans = ", ".join(f"{_md(k)}: {_code(v)}" for k, v in r["spans"].items())
                lines.append(f"**{_md(r['prompt'])}** &rarr; {_code(r['filled'])} ({spans or 'no span'})")
        return "\n\n".join(lines)

    # -- when -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last_step or step == 0 or step % self.every_n_steps:
            return  # not a sampling step, or still accumulating gradients
        self._last_step = step
        sharded = _fsdp2_root(pl_module.model)
        if sharded is None and not trainer.is_global_zero:
            return
        if sharded is not None:  # every rank gathers the weights and runs the same generation
            sharded.unshard()
        try:
            objective, results = self.samples(pl_module)
        finally:
            if sharded is not None:
                sharded.reshard()
        if not trainer.is_global_zero:
            return
        text = self.markdown(objective, results)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text(f"samples/{objective}", text, global_step=step)
        log.info("samples at step %d:\n%s", step, text)


def _fsdp2_root(model: torch.nn.Module) -> Any:
    """The model when FSDP2 (`fully_shard`) manages it, else None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return None
    return model if isinstance(model, FSDPModule) else None


def _md(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "⏎") + "`"
