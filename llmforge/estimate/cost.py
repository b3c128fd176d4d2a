"""Money and the decision: GPU table, prices per GPU-hour, and the pre-train / continue / fine-tune
decision tree (given only when asked: a ``domain`` or a ``budget``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from llmforge.estimate.flops import TOKENS_PER_PARAM, compute_optimal_tokens

DEFAULT_GPUS: dict[str, dict[str, float]] = {
    "a100": {"peak_tflops": 312.0, "memory_gb": 40.0},
    "h100": {"peak_tflops": 989.0, "memory_gb": 80.0},
    "h200": {"peak_tflops": 989.0, "memory_gb": 141.0},
}
# MFU measured by experiments/gpu_check.sh (experiments/bench_gpu.py) on one GPU of a type, per precision:
# the 1b preset at seq 4096 in the trainer's default GPU configuration (torch.compile per block, chunked
# linear + cross-entropy, fused AdamW), bf16-mixed and fp8-mixed, MFU against the dense bf16 peak.
# `estimate` takes it as its default MFU for that GPU and precision; elsewhere FALLBACK_MFU. bench_gpu.py
# prints the entry to put here; each figure is in experiments/LEDGER.md with its commit.
MEASURED_MFU: dict[str, dict[str, float]] = {}  # e.g. {"h200": {"bf16-mixed": 0.45, "fp8-mixed": 0.52}}
FALLBACK_MFU = 0.4  # without a measurement: a typical dense-training MFU (PaLM 46%, OLMo-2 ~45%, MPT ~42%)
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    # A100 40 GB on-demand list prices when this table was written (the project's course material quoted
    # them); yours differ: prices.a100.<provider>=<dollars per GPU-hour>
    "a100": {"aws": 4.00, "gcp": 3.67, "azure": 3.40, "lambda": 1.10},
    "h100": {},
    "h200": {},
}
DOMAINS = ("general", "specific", "rare_language", "proprietary", "custom_architecture")


@dataclass
class Recommendation:
    decision: str | None  # "pre-train" | "continue pre-training" | "fine-tune"; None: no domain given
    model_size: str  # what the budget buys
    reasons: list[str]


def human(x: float) -> str:
    """3 significant digits and a unit: 1.2e10 -> "12B"."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def recommend(
    *, corpus_tokens: float, domain: str | None, budget: float | None, cost: float | None, params: float
) -> Recommendation:
    """The decision tree (see the `llmforge.estimate` docstring); ``domain`` None: the budget's part only."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"domain={domain!r} is not one of {', '.join(DOMAINS)}")
    reasons: list[str] = []
    decision: str | None = None
    if domain is None:
        pass
    elif domain == "general":
        decision = "fine-tune"
        reasons.append("no need for a custom model: start from an existing pre-trained model")
    elif domain == "specific":
        if corpus_tokens < 10e9:
            decision = "fine-tune"
            reasons.append(f"specific domain, corpus {human(corpus_tokens)} tokens < 10B: fine-tune")
        elif corpus_tokens > 100e9:
            decision = "pre-train"
            reasons.append(f"specific domain, corpus {human(corpus_tokens)} tokens > 100B: pre-train")
        else:
            decision = "continue pre-training"
            reasons.append(
                f"specific domain, corpus {human(corpus_tokens)} tokens between 10B and 100B: continue "
                "pre-training an existing model (~10x cheaper than from scratch if the domain is close)"
            )
    else:
        decision = "pre-train"
        why = {
            "rare_language": "a rare language: existing models handle it poorly",
            "proprietary": "proprietary or sensitive data: full control, no leak",
            "custom_architecture": "a custom architecture: nothing to start from",
        }[domain]
        reasons.append(f"{why}: pre-train")
    if budget is None:
        size = "no budget given"
    elif budget < 10e3:
        size = "fine-tune, or a small model (1-3B)"
    elif budget <= 100e3:
        size = "7-13B"
    elif budget < 1e6:
        size = "13-70B (an interpolation: the rule of thumb jumps from 7-13B at $100k to 70B+ at $1M)"
    else:
        size = "70B+"
    if budget is not None:
        reasons.append(f"budget ${human(budget)}: {size}")
        if cost is not None and decision == "pre-train" and cost > budget:
            reasons.append(
                f"this plan costs ${human(cost)} (cheapest price for the chosen GPU), over the budget: "
                "fewer tokens, a smaller model, or continue pre-training instead"
            )
    optimal = compute_optimal_tokens(params)
    if decision == "pre-train" and corpus_tokens < optimal:
        epochs = optimal / corpus_tokens
        reasons.append(
            f"the corpus has {corpus_tokens / params:.1f} tokens per parameter (< {TOKENS_PER_PARAM:.0f}): "
            f"compute-optimal training repeats it {epochs:.1f} times (up to ~4 epochs cost little, "
            "Muennighoff et al. 2023), or pick a smaller model"
        )
    return Recommendation(decision=decision, model_size=size, reasons=reasons)


def default_mfu(
    gpu: str, precision: str, measured: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[float, str]:
    """(MFU, where it comes from): the measured MFU of ``gpu`` at ``precision`` (`MEASURED_MFU`) when there
    is one, else `FALLBACK_MFU`."""
    table = MEASURED_MFU if measured is None else measured
    value = (table.get(gpu) or {}).get(precision)
    if value is None:
        return FALLBACK_MFU, f"assumed: no measured MFU for {gpu} at {precision}"
    return float(value), f"measured on {gpu} at {precision} (experiments/gpu_check.sh)"
