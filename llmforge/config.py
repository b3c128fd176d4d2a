"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

`conf/train.yaml` starts its defaults list with ``train_schema``, so every composed run is checked against
these dataclasses: a misspelt key or a value of the wrong type fails at composition and names the key.
Values drawn from a fixed set are checked by `validate`, which names the key and the allowed values.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from llmforge.models.config import TransformerConfig

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "fp8-mixed")
STRATEGIES = ("auto", "ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant", "wsd", "wsd_decay")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
DOCUMENT_POSITIONS = ("continue", "reset")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


DENOISE_VARIANTS = ("span", "infill")


@dataclass
class ObjectiveConfig:
    """The objective group's schema: the LightningModule and its name. Objectives with knobs extend it
    (`MaskedLMConfig`, `DenoiseConfig`); their yaml file names the extension in its defaults list, so a
    misspelt knob fails at composition like any other key."""

    _target_: str = "llmforge.objectives.clm.CausalLM"
    name: str = "clm"
    fused_ce: bool = True  # chunked head + cross-entropy: the logits of a whole micro-batch never exist
    z_loss: float = 0.0  # weight of the z-loss, z_loss * mean(logsumexp(logits)^2) (PaLM: 1e-4)


@dataclass
class MaskedLMConfig(ObjectiveConfig):
    _target_: str = "llmforge.objectives.mlm.MaskedLM"
    name: str = "mlm"
    mask_prob: float = 0.15  # share of the maskable tokens (not special, not padding) to predict
    mask_token_prob: float = 0.8  # of those: replaced by <mask>
    random_token_prob: float = 0.1  # replaced by a random non-special token; the rest stay as they are
    whole_word_mask: bool = False  # select whole words (byte-level BPE word starts), not single tokens


@dataclass
class DenoiseConfig(ObjectiveConfig):
    _target_: str = "llmforge.objectives.denoise.Denoise"
    name: str = "denoise"
    variant: str = "span"  # span: T5 span corruption (sentinels); infill: BART text infilling (<mask>)
    noise_density: float = 0.15  # share of the window's tokens that are corrupted
    mean_span_length: float = 3.0  # span: mean noise-span length; infill: Poisson lambda of span lengths
    decoder_start_token: str = "bos"  # special token the decoder starts from


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources.<name>``): a prepared dataset directory and its weight."""

    path: str | None = None
    weight: float = 1.0  # share of training tokens, relative to the other sources' weights


@dataclass
class DataConfig:
    path: str | None = "data/demo"  # one dataset; null when `sources` names a mixture
    sources: dict[str, SourceConfig] = field(default_factory=dict)  # data=mixture: name -> path, weight
    alpha: float | None = None  # mixture temperature rule: weight_s x train_tokens_s ** alpha (null: off)
    seq_len: int = 256
    batch_size: int = 8  # per device, per micro-step
    num_workers: int = 0
    seed: int = 1234
    shuffle: bool = True
    overfit_samples: int = 0  # > 0: train on the first N windows only (debugging)
    document_mask: bool = False  # attention stays inside each EOS-delimited document of a packed window
    document_positions: str = "continue"  # with document_mask: continue | reset (RoPE restarts per document)


@dataclass
class PrecisionConfig:
    value: str = "32-true"


@dataclass
class StrategyConfig:
    name: str = "auto"
    find_unused_parameters: bool = False
    reshard_after_forward: bool = True  # fsdp
    activation_checkpointing: bool = False  # recompute each block's activations in backward (any strategy)
    # torch.compile each block (any strategy): true, false, or auto (on CUDA GPUs, not on CPU)
    compile: Any = "auto"


@dataclass
class HardwareConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    tune_malloc: bool = True  # keep freed memory in glibc's heap (CPU training is faster)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None  # cosine/linear horizon; None: trainer.max_steps
    decay_fraction: float = 0.2  # wsd: the last 20% of the steps decay
    decay_shape: str = "1-sqrt"  # wsd, wsd_decay: linear | cosine | 1-sqrt
    cooldown_steps: int | None = None  # wsd_decay: length of the decay of a cooldown branch
    decay_start: int | None = None  # wsd: None = from decay_fraction; wsd_decay: None = branch_from's step


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    val_check_interval: int = 200
    limit_val_batches: int = 20
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 500
    deterministic: bool = False
    enable_progress_bar: bool = True
    skip_memory_check: bool = False  # start even when llmforge.estimate's peak exceeds the free memory


@dataclass
class TrainConfig:
    name: str = "${objective.name}-${model.name}"
    # runs/<name>, or a sweep job's own directory; Hydra's .hydra/ and train.log go here too (train.yaml)
    run_dir: str = "${llmforge.run_dir:runs/${name}}"
    seed: int = 1234
    resume: str | None = None  # null | auto | path/to.ckpt
    init_from: str | None = None  # weights to start from: a Hugging Face Llama dir or an llmforge .ckpt
    branch_from: str | None = None  # a training checkpoint a new run starts from (cooldown branches)
    model: TransformerConfig = MISSING
    objective: ObjectiveConfig = MISSING
    data: DataConfig = MISSING
    precision: PrecisionConfig = MISSING
    strategy: StrategyConfig = MISSING
    hardware: HardwareConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: Any = None
    callbacks: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    num_sentinels: int = 256  # span corruption needs ~seq_len * 0.15 / 3 sentinels: 256 covers seq_len ~5000
    min_frequency: int = 2
    sample_fraction: float = 1.0  # documents chosen by id hash, in shard order ...
    sample_chars: int = 200_000_000  # ... until this many characters
    path: str | None = None  # reuse this tokenizer (a tokenizer.json or a directory with one): no training


@dataclass
class ReaderConfig:
    # a record whose block, decoded body (Content-Encoding) or extent up to the next record is larger is
    # counted as too_large, never held whole in memory
    max_record_bytes: int = 10 << 20
    text_field: str = "text"  # pipeline=jsonl: the field holding a document's text
    id_field: str | None = "id"  # pipeline=jsonl: its id (absent: <file>:<line>)


@dataclass
class ExtractConfig:
    enabled: bool = True
    main_content: bool = True
    max_html_chars: int = 2_000_000
    timeout_s: float = 5.0  # wall-clock limit per page; the parsing process is killed past it
    max_depth: int = 1000  # tag nesting above this is dropped as too_deep before parsing (0: no check)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    # near copies as users mean them (a page with a few % of its words edited): 3-word shingles, verified at
    # estimated Jaccard >= 0.7, 25 bands x 5 rows of 128 permutations; chosen on real pages by
    # experiments/bench_minhash.py (d): recall 0.99 / 0.96 at 1% / 3% edited words (README, docs/dedup.md)
    threshold: float = 0.7
    num_perm: int = 128
    ngram: int = 3
    seed: int = 1
    bands: int | None = None  # None: chosen for the threshold by llmforge.prep.dedup.lsh_params
    rows: int | None = None
    tasks: int | None = None  # per dedup stage; None: one per ~256 MiB of signatures, <= workers (local)
    memory_gb: float = 1.0  # records a dedup task sorts in memory before spilling sorted runs to disk


@dataclass
class ExecutorConfig:
    name: str = "local"  # local | slurm | ray
    workers: int = 2  # local: worker processes; ray without an address: CPUs of the Ray started here
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit parameters
    address: str | None = None  # ray: a cluster's host:port, or "auto"; null: start Ray here (ray.init())
    max_retries: int = 3  # ray: reruns of a task whose worker process died (a raised error is not retried)
    cpus_per_task: float = 1.0  # ray: CPUs reserved per task
    runtime_env: dict[str, Any] = field(default_factory=dict)  # ray: runtime_env for ray.init


@dataclass
class PrepareConfig:
    input: Any = "demo"  # "demo", "stdlib", paths, globs, URLs or *.paths.gz listings (a string or a list)
    output_dir: str = "data/demo"
    base_url: str = "https://data.commoncrawl.org/"
    files_per_shard: int = 1000  # plain text files grouped per shard
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    clean: dict[str, Any] = field(default_factory=dict)  # llmforge.prep.clean.Clean arguments + enabled
    filters: dict[str, Any] = field(default_factory=dict)  # llmforge.prep.filters.build_filters
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    val_fraction: float = 0.02
    shard_tokens: int = 1 << 26
    dropped_samples: int = 50  # per step and reason, in output_dir/dropped/
    keep_downloads: bool = False  # keep downloaded crawl files once their shard's process stage is done
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    progress: bool = True


# What a ``_target_`` anywhere in a train config may name: llmforge's own classes, PyTorch and Lightning.
# Anything else (``shutil.copyfile``, ``builtins.open`` from a command-line override) is refused before
# anything is instantiated. Own callbacks elsewhere: their module prefixes, comma-separated, in the
# environment variable below (the test suite adds ``tests.``).
ALLOWED_TARGETS = ("llmforge.", "torch.", "lightning.")
EXTRA_TARGETS_ENV = "LLMFORGE_EXTRA_TARGETS"


def allowed_targets() -> tuple[str, ...]:
    extra = os.environ.get(EXTRA_TARGETS_ENV, "")
    return ALLOWED_TARGETS + tuple(p.strip() for p in extra.split(",") if p.strip().endswith("."))


def locate(target: str) -> Any:
    """The object a dotted ``_target_`` names (its module imported), or None when there is none."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            found = getattr(found, name, None)
            if found is None:
                return None
        return found
    return None


def check_targets(node: Any, prefix: str = "") -> None:
    """Walks a composed config; every ``_target_`` must name something under `allowed_targets`."""
    if OmegaConf.is_dict(node):
        items = [(str(k), f"{prefix}{k}") for k in node.keys()]
    elif OmegaConf.is_list(node):
        items = [(i, f"{prefix[:-1]}[{i}].") for i in range(len(node))]
    else:
        return
    for key, path in items:
        if key == "_target_":
            target = node[key]
            allowed = allowed_targets()
            if not (isinstance(target, str) and target.startswith(allowed)):
                raise ValueError(
                    f"{path}={target!r} is refused: a _target_ must name a class under "
                    f"{', '.join(a + '*' for a in allowed)} (more: ${EXTRA_TARGETS_ENV})"
                )
            found = locate(target)
            if not isinstance(found, type):  # torch.load, torch.hub.load: functions that run code
                what = "nothing importable" if found is None else f"a {type(found).__name__}"
                raise ValueError(
                    f"{path}={target!r} is refused: a _target_ must name a class, this is {what}"
                )
            continue
        child = node._get_node(key)
        if OmegaConf.is_dict(child) or OmegaConf.is_list(child):
            check_targets(child, f"{path}." if not path.endswith(".") else path)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: Any) -> None:
    """Checks the composed train config beyond types: targets, choices, ranges and cross-field rules."""
    check_targets(cfg)
    check_choice("precision.value", cfg.precision.value, PRECISIONS)
    check_choice("strategy.name", cfg.strategy.name, STRATEGIES)
    check_choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    check_choice("optim.decay_shape", cfg.optim.decay_shape, DECAY_SHAPES)
    if not 0.0 <= cfg.optim.decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction must be in [0, 1], got {cfg.optim.decay_fraction}")
    if cfg.optim.schedule == "wsd_decay":
        if not cfg.optim.cooldown_steps or cfg.optim.cooldown_steps < 1:
            raise ValueError("optim.schedule=wsd_decay needs optim.cooldown_steps (the decay's length) >= 1")
        if not cfg.branch_from and cfg.optim.decay_start is None:
            raise ValueError("optim.schedule=wsd_decay needs branch_from=CKPT (or optim.decay_start)")
    check_choice("hardware.accelerator", cfg.hardware.accelerator, ACCELERATORS)
    check_choice("data.document_positions", cfg.data.document_positions, DOCUMENT_POSITIONS)
    if "variant" in cfg.objective:
        check_choice("objective.variant", cfg.objective.variant, DENOISE_VARIANTS)
    if cfg.optim.name != "adamw":
        raise ValueError(f"optim.name={cfg.optim.name!r} is not one of adamw")
    if not cfg.data.sources and not cfg.data.path:
        raise ValueError("data.path is empty and data.sources names no source: give one or the other")
    if cfg.data.sources and cfg.data.path:
        raise ValueError(
            f"data.path={cfg.data.path} and data.sources are both set: a mixture (data=mixture) takes its "
            "sources from data.sources only; set data.path=null"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.trainer.max_steps <= 0:
        raise ValueError(f"trainer.max_steps must be positive, got {cfg.trainer.max_steps}")
    check_ranges(cfg)
    if cfg.strategy.compile not in (True, False, "auto"):
        raise ValueError(f"strategy.compile={cfg.strategy.compile!r} is not one of true, false, auto")
    if cfg.precision.value == "16-mixed" and cfg.hardware.accelerator == "cpu":
        raise ValueError("precision.value='16-mixed' needs a GPU; on CPU use bf16-mixed or bf16-true")
    if cfg.precision.value == "16-mixed" and cfg.strategy.name == "fsdp":
        raise ValueError(
            "precision.value='16-mixed' is not supported with strategy.name='fsdp' (Lightning's "
            "ModelParallelStrategy has no fp16 loss scaling): use bf16-mixed or bf16-true"
        )


def check_range(
    key: str, value: Any, low: float | None, high: float | None = None, *, none_ok: bool = False
) -> None:
    """``value`` within [low, high] (either end open when None), or None when ``none_ok``."""
    if value is None and none_ok:
        return
    if value is None or (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f">= {low}"
        hi = "" if high is None else f"<= {high}"
        allowed = " and ".join(x for x in (lo, hi) if x) + (" or null" if none_ok else "")
        raise ValueError(f"{key}={value!r} is out of range: allowed {allowed}")


def check_devices(devices: Any) -> None:
    """Lightning's ``devices``: a count >= 1, -1 (all), "auto", or a list of device indices."""
    value = OmegaConf.to_container(devices) if OmegaConf.is_config(devices) else devices
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    ok = (
        value == "auto"
        or (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1))
        or (isinstance(value, list) and value and all(isinstance(i, int) and i >= 0 for i in value))
    )
    if not ok:
        raise ValueError(
            f"hardware.devices={value!r} is out of range: allowed a count >= 1, -1 (all), auto, "
            "or a list of device indices"
        )


def check_ranges(cfg: Any) -> None:
    """Numeric knobs a run cannot use, each named with its allowed range (one line)."""
    t, o = cfg.trainer, cfg.optim
    check_devices(cfg.hardware.devices)
    check_range("hardware.num_nodes", cfg.hardware.num_nodes, 1)
    check_range("trainer.accumulate_grad_batches", t.accumulate_grad_batches, 1)
    check_range("trainer.ckpt_every_n_steps", t.ckpt_every_n_steps, 1)
    check_range("trainer.val_check_interval", t.val_check_interval, 1)
    check_range("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    check_range("trainer.limit_val_batches", t.limit_val_batches, 0)
    check_range("trainer.gradient_clip_val", t.gradient_clip_val, 0, none_ok=True)
    check_range("optim.lr", o.lr, 0)
    check_range("optim.warmup_steps", o.warmup_steps, 0)
    check_range("optim.min_lr_ratio", o.min_lr_ratio, 0, 1)
    check_range("optim.weight_decay", o.weight_decay, 0)
    check_range("optim.decay_steps", o.decay_steps, 1, none_ok=True)
    for i, beta in enumerate(o.betas):
        check_range(f"optim.betas[{i}]", beta, 0, 1)
    check_range("data.batch_size", cfg.data.batch_size, 1)
    check_range("data.seq_len", cfg.data.seq_len, 2)


def check_hardware(cfg: Any) -> None:
    """What this machine has: ``hardware.accelerator=gpu`` needs a visible CUDA GPU (checked at run time,
    not by `validate`, so that GPU configs compose and validate anywhere)."""
    import torch

    if cfg.hardware.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"hardware.accelerator={cfg.hardware.accelerator!r} but no CUDA GPU is visible on this machine: "
            "allowed here cpu (hardware=cpu)"
        )


def check_group_overrides(args: list[str], conf_dir: Path) -> None:
    """A config-group override with a bare number (``precision=32``) is read by Hydra as an integer and
    fails deep inside it: name the group and its options instead."""
    for arg in args:
        m = re.fullmatch(r"[+~]?([\w.]+)=(-?[\d.]+)", arg)
        if m and (conf_dir / m.group(1)).is_dir():
            group = m.group(1)
            options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            raise ValueError(f"{arg}: {group} is a config group; allowed options: {', '.join(options)}")


def resolve_compile(compile: Any, accelerator: str) -> bool:
    """``strategy.compile``: auto is on for CUDA GPUs (it pays there) and off on CPU (compilation takes
    longer than it saves on short runs, and needs a C++ compiler)."""
    if compile == "auto":
        if accelerator == "auto":
            import torch

            return torch.cuda.is_available()
        return accelerator in ("gpu", "cuda")
    return bool(compile)


def gpus_per_node(accelerator: str, devices: Any) -> Any:
    """conf/hydra/launcher/slurm.yaml's GPUs per node: `hardware.devices` on GPUs, none on CPUs."""
    return devices if accelerator in ("gpu", "cuda") else None


def default_run_dir(default: str) -> str:
    """``run_dir``'s default: Hydra's output directory of this job once it is known (a sweep job's
    ``hydra.sweep.dir``/``subdir``, or a ``hydra.run.dir=`` given on the command line), else ``default``
    (``runs/<name>``) made absolute. ``hydra.run.dir`` is ``${run_dir}``, so a single run's Hydra files and
    logs land in its run dir whatever ``run_dir=`` says, and the two never differ."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        runtime = HydraConfig.get().runtime
        if not OmegaConf.is_missing(runtime, "output_dir") and runtime.output_dir:
            return str(runtime.output_dir)
    return os.path.abspath(default)


def _slurm_fit(*args: Any) -> Any:
    from llmforge.slurm import fit_to_partition  # imports Lightning: only when a SLURM launcher resolves

    return fit_to_partition(*args)


def register() -> None:
    if not OmegaConf.has_resolver("llmforge.gpus_per_node"):
        OmegaConf.register_new_resolver("llmforge.gpus_per_node", gpus_per_node)
    if not OmegaConf.has_resolver("llmforge.run_dir"):
        OmegaConf.register_new_resolver("llmforge.run_dir", default_run_dir)
    if not OmegaConf.has_resolver("llmforge.slurm_fit"):
        OmegaConf.register_new_resolver("llmforge.slurm_fit", _slurm_fit)
    if not OmegaConf.has_resolver("llmforge.job_dir"):
        from llmforge.multirun import sweep_subdir

        OmegaConf.register_new_resolver("llmforge.job_dir", sweep_subdir)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # schemas of the objective group, not options of it (`objective=mlm_schema` must not train)
    cs.store(name="objective_mlm_schema", node=MaskedLMConfig)
    cs.store(name="objective_denoise_schema", node=DenoiseConfig)
    cs.store(name="prepare_schema", node=PrepareConfig)
