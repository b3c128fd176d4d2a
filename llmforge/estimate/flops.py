"""Training compute: FLOPs per token by objective, 6ND, compute-optimal tokens, GPU-hours."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmforge.config import DenoiseConfig, MaskedLMConfig, ObjectiveConfig

TOKENS_PER_PARAM = 20.0  # Chinchilla's compute-optimal ratio
OBJECTIVES = {"clm": "decoder", "mlm": "encoder", "denoise": "encdec"}


@dataclass(frozen=True)
class Objective:
    """The training objective's shape-relevant knobs (defaults: the objective group's)."""

    name: str = "clm"
    mask_prob: float = MaskedLMConfig.mask_prob  # mlm: share of the positions the head runs on
    variant: str = DenoiseConfig.variant  # denoise: span (T5) | infill (BART)
    noise_density: float = DenoiseConfig.noise_density
    mean_span_length: float = DenoiseConfig.mean_span_length
    fused_ce: bool = ObjectiveConfig.fused_ce  # the chunked head: no logits of the whole micro-batch

    @property
    def arch(self) -> str:
        return OBJECTIVES[self.name]

    def lengths(self, seq_len: int) -> tuple[int, int]:
        """(encoder or decoder-only input, decoder input) lengths for a window of seq_len corpus tokens."""
        if self.name != "denoise":
            return seq_len, 0
        if self.variant != "span":
            return seq_len, seq_len
        from llmforge.objectives.denoise import span_lengths  # imports Lightning: only for this objective

        return span_lengths(seq_len, self.noise_density, self.mean_span_length)

    def predicted(self, seq_len: int) -> float:
        """Positions per window the head and the loss run on."""
        return {"clm": seq_len, "mlm": seq_len * self.mask_prob, "denoise": self.lengths(seq_len)[1]}[
            self.name
        ]


def as_objective(objective: str | Mapping[str, Any] | Objective) -> Objective:
    """A name (clm, mlm, denoise), a mapping such as a composed objective group, or an Objective."""
    if isinstance(objective, Objective):
        result = objective
    elif isinstance(objective, str):
        result = Objective(name=objective)
    else:
        known = set(Objective.__dataclass_fields__)
        result = Objective(**{k: v for k, v in objective.items() if k in known})
    if result.name not in OBJECTIVES:
        raise ValueError(f"objective={result.name!r} is not one of {', '.join(OBJECTIVES)}")
    return result


def training_flops(params: float, tokens: float) -> float:
    """6 * N * D: forward (2) and backward (4) FLOPs per parameter per token."""
    return 6.0 * params * tokens


def compute_optimal_tokens(params: float) -> float:
    """Chinchilla's rule of thumb: about 20 training tokens per parameter."""
    return TOKENS_PER_PARAM * params


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0
