"""`estimate`: one run's size, compute, time, memory and money, as an `Estimate`; and the same from
``conf/estimate.yaml`` with command-line style overrides (`compose`, `from_config`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmforge.config import ObjectiveConfig, PrecisionConfig
from llmforge.estimate.cost import DEFAULT_GPUS, DEFAULT_PRICES, Recommendation, default_mfu, recommend
from llmforge.estimate.flops import Objective, as_objective, compute_optimal_tokens, gpu_hours, training_flops
from llmforge.estimate.memory import STRATEGIES, Memory, memory_per_gpu, precision_bytes
from llmforge.models.transformer import TransformerConfig, flops_per_token, num_params

CONF = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class Estimate:
    model: str
    objective: str  # clm | mlm | denoise: decoder, encoder or encoder-decoder
    config: dict[str, Any]
    params: int
    non_embedding_params: int
    seq_len: int
    tokens: float
    tokens_per_param: float
    flops_per_token: float  # PaLM: 6 x matmul parameters + attention
    flops_per_token_6n: float
    total_flops: float
    total_flops_6nd: float
    compute_optimal_tokens: float
    gpu: str
    num_gpus: int
    mfu: float  # for `gpu`
    mfu_source: str  # "given", "measured on <gpu> at <precision> ...", or "assumed: ..."
    mfu_by_gpu: dict[str, float]  # the MFU each GPU type's GPU-hours assume
    precision: str
    batch_size: int
    gpu_hours: dict[str, float]  # per GPU type in the table
    days: float  # on num_gpus of `gpu`
    cost: dict[str, dict[str, float]]  # gpu -> provider -> US dollars
    memory: list[Memory]
    recommendation: Recommendation | None  # only when asked: a domain or a budget was given
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def load_preset(name: str) -> dict[str, Any]:
    """conf/model/<name>.yaml as a dict."""
    from omegaconf import OmegaConf

    path = CONF / "model" / f"{name}.yaml"
    if not path.exists():
        presets = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ValueError(f"model={name!r} is not a preset: choose one of {', '.join(presets)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def model_config(model: str | TransformerConfig | Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """A preset name, a config or a dict of `TransformerConfig` fields, with overrides applied."""
    if isinstance(model, TransformerConfig):
        raw = asdict(model)
    elif isinstance(model, str):
        raw = load_preset(model)
    else:
        raw = dict(model)
    known = set(TransformerConfig.__dataclass_fields__)
    for key in [*raw, *overrides]:
        if key not in known:
            raise ValueError(f"model.{key} is not a model key: choose from {', '.join(sorted(known))}")
    raw.update(overrides)
    cfg = TransformerConfig(**raw)
    if cfg.vocab_size is None:
        raise ValueError(
            f"model.vocab_size is null in model={cfg.name} (taken from the data when training): "
            "give it, e.g. model.vocab_size=32000"
        )
    return cfg


def model_name(cfg: TransformerConfig) -> str:
    """The preset's name, followed by the fields that differ from the preset (``7b with n_layers=40``),
    so that a table of an overridden preset does not claim to be the preset."""
    try:
        preset = load_preset(cfg.name)
    except ValueError:
        return cfg.name
    base = {**asdict(TransformerConfig()), **preset}
    changed = {k: v for k, v in asdict(cfg).items() if base.get(k) != v}
    if base.get("vocab_size") is None:  # tiny, mini: the vocabulary comes from the data
        changed.pop("vocab_size", None)
    return cfg.name + (" with " + ", ".join(f"{k}={v}" for k, v in changed.items()) if changed else "")


def estimate(
    model: str | TransformerConfig | Mapping[str, Any] = "7b",
    *,
    tokens: float | None = None,
    seq_len: int | None = None,
    batch_size: int = 1,
    num_gpus: int = 8,
    gpu: str = "h100",
    mfu: float | None = None,
    precision: str = "bf16-mixed",
    objective: str | Mapping[str, Any] | Objective = "clm",
    corpus_tokens: float | None = None,
    budget: float | None = None,
    domain: str | None = None,
    gpus: Mapping[str, Mapping[str, float]] | None = None,
    prices: Mapping[str, Mapping[str, float]] | None = None,
    **model_overrides: Any,
) -> Estimate:
    """Everything `python -m llmforge.estimate` prints, as a dataclass (see the module docstring).
    ``mfu=None``: the MFU measured on ``gpu`` at ``precision`` (`llmforge.estimate.cost.MEASURED_MFU`),
    else `FALLBACK_MFU`."""
    cfg = model_config(model, **model_overrides)
    gpus = {k: dict(v) for k, v in (gpus if gpus is not None else DEFAULT_GPUS).items()}
    prices = {  # a null price: not known
        k: {p: x for p, x in (v or {}).items() if x is not None}
        for k, v in (prices if prices is not None else DEFAULT_PRICES).items()
    }
    if gpu not in gpus:
        raise ValueError(f"gpu={gpu!r} is not one of {', '.join(gpus)} (add it under gpus.{gpu})")
    for name, spec in gpus.items():
        if set(spec) != {"peak_tflops", "memory_gb"}:
            raise ValueError(f"gpus.{name} needs exactly peak_tflops and memory_gb, got {sorted(spec)}")
    for name, by_provider in prices.items():
        if name not in gpus:
            raise ValueError(f"prices.{name}: no such GPU in gpus ({', '.join(gpus)})")
        for provider, price in by_provider.items():
            if isinstance(price, bool) or not isinstance(price, int | float) or price < 0:
                raise ValueError(f"prices.{name}.{provider}={price!r} is not a price in dollars per GPU-hour")
    precision_bytes(precision)
    mfu_by_gpu = {name: float(mfu) if mfu is not None else default_mfu(name, precision)[0] for name in gpus}
    mfu_source = "given" if mfu is not None else default_mfu(gpu, precision)[1]
    seq_len = seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    for key, value in (("batch_size", batch_size), ("num_gpus", num_gpus)):
        if value < 1:
            raise ValueError(f"{key}={value} must be >= 1")

    obj = as_objective(objective)
    arch = obj.arch
    n = num_params(cfg, arch=arch)
    optimal = compute_optimal_tokens(n)
    tokens = float(tokens) if tokens is not None else optimal
    if tokens <= 0:
        raise ValueError(f"tokens={tokens} must be positive")
    if arch == "encdec":  # per corpus token: the encoder on the inputs, the decoder on the targets
        inputs, targets = obj.lengths(seq_len)
        fpt = flops_per_token(cfg, inputs, arch=arch, target_len=targets) * inputs / seq_len
    else:
        predicted = obj.predicted(seq_len) if arch == "encoder" else None
        fpt = flops_per_token(cfg, seq_len, arch=arch, predicted=predicted)
    total = fpt * tokens
    hours = {name: gpu_hours(total, spec["peak_tflops"], mfu_by_gpu[name]) for name, spec in gpus.items()}
    cost = {name: {p: hours[name] * price for p, price in prices.get(name, {}).items()} for name in gpus}
    chosen_costs = list(cost.get(gpu, {}).values())
    memory = [
        memory_per_gpu(
            cfg,
            strategy=strategy,
            num_gpus=num_gpus,
            precision=precision,
            seq_len=seq_len,
            batch_size=batch_size,
            activation_checkpointing=ckpt,
            gpu_memory_gb=gpus[gpu]["memory_gb"],
            objective=obj,
        )
        for strategy in STRATEGIES
        for ckpt in (False, True)
    ]
    corpus = float(corpus_tokens) if corpus_tokens is not None else tokens
    rec = None
    if domain is not None or budget is not None:  # pre-train vs fine-tune advice: only when asked
        rec = recommend(
            corpus_tokens=corpus,
            domain=domain,
            budget=budget,
            cost=min(chosen_costs) if chosen_costs else None,
            params=n,
        )
    notes = []
    if arch != "decoder":
        notes.append(
            "compute-optimal tokens: Chinchilla's 20 per parameter was fitted on decoder-only models"
        )
    if not chosen_costs:
        notes.append(
            f"no price for {gpu} (on-demand rates vary several-fold between providers and over time): "
            f"give yours as prices.{gpu}.<provider>=<dollars per GPU-hour>, e.g. prices.{gpu}.lambda=2.5"
        )
    return Estimate(
        model=model_name(cfg),
        objective=obj.name,
        config=asdict(cfg),
        params=n,
        non_embedding_params=num_params(cfg, include_embedding=False, arch=arch),
        seq_len=seq_len,
        tokens=tokens,
        tokens_per_param=tokens / n,
        flops_per_token=fpt,
        flops_per_token_6n=6.0 * n,
        total_flops=total,
        total_flops_6nd=training_flops(n, tokens),
        compute_optimal_tokens=optimal,
        gpu=gpu,
        num_gpus=num_gpus,
        mfu=mfu_by_gpu[gpu],
        mfu_source=mfu_source,
        mfu_by_gpu=mfu_by_gpu,
        precision=precision,
        batch_size=batch_size,
        gpu_hours=hours,
        days=hours[gpu] / num_gpus / 24.0,
        cost=cost,
        memory=memory,
        recommendation=rec,
        notes=notes,
    )


# -- conf/estimate.yaml ----------------------------------------------------------------------------------
@dataclass
class GPUSpec:
    peak_tflops: float  # dense bf16
    memory_gb: float


@dataclass
class EstimateConfig:
    """conf/estimate.yaml's schema."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    tokens: float | None = None
    seq_len: int | None = None
    batch_size: int = 1
    num_gpus: int = 8
    gpu: str = "h100"
    mfu: float | None = None  # null: measured for this gpu and precision when known, else 0.4
    precision: PrecisionConfig = field(default_factory=lambda: PrecisionConfig("bf16-mixed"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    corpus_tokens: float | None = None
    budget: float | None = None
    domain: str | None = None
    json: bool = False
    gpus: dict[str, GPUSpec] = field(default_factory=dict)
    prices: dict[str, Any] = field(default_factory=dict)  # gpu -> provider -> dollars per GPU-hour


def compose(overrides: list[str]) -> Any:
    """conf/estimate.yaml composed with command-line style overrides (``model=1b tokens=2e10 ...``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from llmforge.config import register

    register()  # the objective group's schemas
    ConfigStore.instance().store(name="estimate_schema", node=EstimateConfig)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="estimate", overrides=overrides)


def from_config(cfg: Any) -> Estimate:
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c["precision"] = c["precision"]["value"]
    return estimate(c.pop("model"), **{k: v for k, v in c.items() if k != "json"})
