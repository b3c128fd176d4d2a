"""`LlmforgeLM`: an llmforge causal model as an lm-evaluation-harness model (registered as ``llmforge``).

Requests are scored exactly as lm-eval's own Hugging Face model (``hf``) scores them, so the two agree on
an exported checkpoint (``tests/test_downstream.py`` checks it request by request):

- ``loglikelihood(context, continuation)``: lm-eval's `TemplateLM` tokenizes the pair (trailing spaces of
  the context move to the continuation; the whole string is encoded, the context's tokens split off); an
  empty context is replaced by the prefix token. Inputs longer than the model's ``max_seq_len`` keep their
  last ``max_seq_len`` tokens. Requests are sorted by length and run ``batch_size`` at a time, right-padded
  (a causal model's logits do not depend on the padding after them).
- ``loglikelihood_rolling(text)``: the text's tokens in disjoint windows of ``max_seq_len`` (lm-eval's
  rolling windows, context 1), summed.
- ``generate_until(context, gen_kwargs)``: llmforge's batched KV-cache decoding (greedy, or sampled when
  ``do_sample`` with ``temperature``/``top_k``/``top_p``), cut at the first stop string; the prompt starts
  after EOS, as in ``python -m llmforge.generate``.

The prefix token (what an empty context, and each rolling text, is conditioned on) is EOS: llmforge packs
documents with EOS between them, so EOS is what a model has seen before the start of a document. (lm-eval's
``hf`` model takes BOS when the tokenizer has one; pass it ``prefix_token_id=<eos id>`` to compare.)

Only causal checkpoints (``objective=clm``) answer these requests: an MLM encoder has no left-to-right
likelihood and the span-corruption models are trained to fill sentinels, not to continue text, so both are
refused with one line.

``python -m llmforge.lm_eval`` is lm-eval's own command line with this model registered
(lm-eval 0.4 finds models only in its own registry, so the plain ``lm_eval`` command cannot see it):
``python -m llmforge.lm_eval --model llmforge --model_args checkpoint=runs/demo --tasks ...``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llmforge.checkpoints import LoadedModel, load_model
from llmforge.inference import DTYPES, Sampling, generate_ids

DEFAULT_MAX_GEN_TOKS = 256
log = logging.getLogger(__name__)


@register_model("llmforge")
class LlmforgeLM(TemplateLM):
    """An llmforge checkpoint (file, run directory, or exported Hugging Face directory) for lm-eval."""

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str = "cpu",
        batch_size: int | str = 8,
        dtype: str = "fp32",
        tokenizer: str | None = None,
        max_length: int | None = None,
        loaded: LoadedModel | None = None,
        **_: Any,
    ) -> None:
        super().__init__()
        if loaded is None:
            if checkpoint is None:
                raise ValueError(
                    "model_args needs checkpoint=PATH (a .ckpt, a run directory or an HF export)"
                )
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
            loaded = load_model(checkpoint, device=_device(device), dtype=DTYPES[dtype], tokenizer=tokenizer)
        if loaded.objective != "clm":
            raise ValueError(
                f"lm-eval scores left-to-right continuations; a {loaded.objective} checkpoint cannot answer "
                "loglikelihood or generate_until requests (evaluate it with python -m llmforge.evaluate)"
            )
        if loaded.tokenizer is None:
            raise ValueError("no tokenizer found for this checkpoint: pass tokenizer=PATH in model_args")
        self.lm = loaded
        self.model = loaded.model
        self.tok = loaded.tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self._max_length = int(max_length or self.model.cfg.max_seq_len)
        self._eos = int(loaded.special_tokens["eos"])
        self._pad = int(loaded.special_tokens.get("pad", 0))

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, batch_size: int = 8) -> LlmforgeLM:
        """Wrap a model already in memory (the in-training model of `DownstreamEval`)."""
        return cls(loaded=loaded, batch_size=batch_size)

    # -- what TemplateLM needs ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError(f"request {i}: the continuation is empty after tokenization")
            inp = (context + continuation)[-(self.max_length + 1) :][:-1]
            rows.append((i, inp, len(continuation), continuation))
        rows.sort(key=lambda r: (-len(r[1]), r[1]))  # longest first: padding is bounded, OOM shows early
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            width = max(len(r[1]) for r in chunk)
            tokens = torch.full((len(chunk), width), self._pad, dtype=torch.long)
            for j, (_, inp, _, _) in enumerate(chunk):
                tokens[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logits = self.model(tokens.to(self.device)).float()
            for j, (i, inp, n, continuation) in enumerate(chunk):
                scored = F.log_softmax(logits[j, len(inp) - n : len(inp)], dim=-1)
                target = torch.tensor(continuation, device=scored.device)
                logprob = float(scored.gather(-1, target[:, None]).sum())
                greedy = bool((scored.argmax(dim=-1) == target).all())
                out[i] = (logprob, greedy)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            (text,) = request.args
            for context, pred in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, context, pred))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[tuple[int, str, dict]]] = {}
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append((i, context, dict(gen_kwargs)))
        for items in groups.values():
            kwargs = items[0][2]
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sampling = Sampling(
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                top_k=int(kwargs.get("top_k") or 0),
                top_p=float(kwargs.get("top_p") or 1.0),
            )
            budget = self.max_length - max_new
            if budget < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in {self.max_length}")
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                prompts = [([self._eos] + self.tok_encode(c))[-budget:] for _, c, _ in chunk]
                new = generate_ids(
                    self.model,
                    prompts,
                    max_new,
                    sampling=sampling,
                    seed=int(kwargs.get("seed", 0)),
                    eos_id=self._eos,
                    pad_id=self._pad,
                    vocab_limit=self.lm.vocab_limit,
                )
                for (i, _, _), ids in zip(chunk, new, strict=True):
                    text = self.tok_decode([t for t in ids if t != self._eos])
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    results[i] = text
        return results


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        # lm-eval's command line asks for cuda by default; its hf model falls back to the CPU the same way
        log.warning("device=%s: no CUDA device here, using the CPU", name)
        return torch.device("cpu")
    return torch.device(name)
