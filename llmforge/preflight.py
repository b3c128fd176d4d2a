"""The memory pre-flight: before the model is allocated, `llmforge.estimate`'s peak per device is compared
with the memory the device has free (CPU: the available RAM of this machine or its cgroup, shared by the
ranks started on it; GPU: the free memory of each device), and a run that cannot fit stops with one line
that says the estimate, the free memory and what to change (``trainer.skip_memory_check=true`` skips it).

`check` is the decision (pure: numbers in, a message or None out); `check_run` gathers the numbers for a
composed train config and raises `MemoryCheckError` (a ValueError: ``error: ...``, exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmforge.estimate.memory import GB, Memory, memory_per_gpu
from llmforge.models.config import TransformerConfig


class MemoryCheckError(ValueError):
    """The run's estimated peak memory exceeds what the device has free."""


@dataclass(frozen=True)
class Plan:
    """What the estimate needs of a run: its shape and how it is spread over devices."""

    model: TransformerConfig
    objective: Mapping[str, Any]
    strategy: str  # auto | ddp | fsdp
    devices: int  # devices (processes) per node
    num_nodes: int
    precision: str
    seq_len: int
    batch_size: int
    activation_checkpointing: bool
    accelerator: str  # cpu | gpu

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def peak(plan: Plan, **changes: Any) -> Memory:
    """`llmforge.estimate.memory_per_gpu` for the run (``changes``: Plan fields, to price an alternative)."""
    p = Plan(**{**plan.__dict__, **changes})
    return memory_per_gpu(
        p.model,
        strategy="fsdp" if p.strategy == "fsdp" else "ddp",
        num_gpus=p.world_size,
        precision=p.precision,
        seq_len=p.seq_len,
        batch_size=p.batch_size,
        activation_checkpointing=p.activation_checkpointing,
        objective=p.objective,
    )


def need_bytes(plan: Plan, per_device: float) -> float:
    """Bytes the pool `free_bytes` measures must hold: on CPU the ranks of a node share its RAM."""
    return per_device * (plan.devices if plan.accelerator == "cpu" else 1)


def check(plan: Plan, free_bytes: float) -> str | None:
    """None when the run's estimated peak fits in ``free_bytes``; else one line: the estimate, the free
    memory, and the changes that would bring the estimate down (each with its own estimate)."""
    est = peak(plan).total
    need = need_bytes(plan, est)
    if need <= free_bytes:
        return None
    where = "available RAM" if plan.accelerator == "cpu" else "free GPU memory per device"
    if need > est:  # CPU ranks of one node
        size = f"{_size(need)} ({_size(est)} per process x {plan.devices} processes; "
    else:
        size = f"{_size(est)} per device ("
    options = []
    for label, changes in _alternatives(plan):
        alt = need_bytes(plan, peak(plan, **changes).total)
        if alt < need:
            options.append(f"{label} ({_size(alt)})")
    options.append("a smaller model")
    advice = "; try " + ", ".join(options)
    return (
        f"memory: this run needs about {size}llmforge.estimate: model={plan.model.name}, "
        f"strategy={plan.strategy}, precision={plan.precision}, micro-batch "
        f"{plan.batch_size} x {plan.seq_len} tokens), more than the {_size(free_bytes)} of {where}"
        f"{advice}; or trainer.skip_memory_check=true to start anyway"
    )


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _alternatives(plan: Plan) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if not plan.activation_checkpointing:
        out.append(("strategy.activation_checkpointing=true", {"activation_checkpointing": True}))
    if plan.batch_size > 1:
        half = max(1, plan.batch_size // 2)
        out.append((f"data.batch_size={half} (accumulate to keep the batch)", {"batch_size": half}))
    if plan.precision in ("32-true", "bf16-mixed", "16-mixed"):
        out.append(("precision=bf16-true", {"precision": "bf16-true"}))
    if plan.strategy != "fsdp" and plan.world_size > 1:
        out.append(("strategy=fsdp", {"strategy": "fsdp"}))
    elif plan.accelerator != "cpu":
        more = plan.devices * 2
        out.append((f"strategy=fsdp hardware.devices={more}", {"strategy": "fsdp", "devices": more}))
    return out


def plan_from_config(cfg: Any, vocab_size: int) -> Plan:
    """The `Plan` of a composed train config; ``vocab_size``: the data's (used when model.vocab_size is
    null, rounded up to a multiple of 64 as `llmforge.training.build_module` does)."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["vocab_size"] is None:
        model["vocab_size"] = 64 * -(-vocab_size // 64)
    devices = cfg.hardware.devices
    if str(devices).isdigit():
        n = int(devices)
    elif cfg.hardware.accelerator == "cpu":
        n = 1
    else:
        n = max(1, gpu_count())
    return Plan(
        model=TransformerConfig(**model),
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        strategy=cfg.strategy.name,
        devices=n,
        num_nodes=int(cfg.hardware.num_nodes),
        precision=cfg.precision.value,
        seq_len=int(cfg.data.seq_len),
        batch_size=int(cfg.data.batch_size),
        activation_checkpointing=bool(cfg.strategy.activation_checkpointing),
        accelerator="cpu" if cfg.hardware.accelerator == "cpu" else "gpu",
    )


# -- free memory --------------------------------------------------------------------------------------
def available_ram() -> float:
    """Bytes of RAM available to new allocations: /proc/meminfo's MemAvailable, lowered to the cgroup's
    limit minus its usage when this process runs in a memory-limited cgroup (containers, SLURM jobs)."""
    free = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024.0
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            free = min(free, float(int(limit) - usage))
        break
    return free


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_gpu_memory(devices: int) -> float:
    """The smallest free memory (bytes) among the first ``devices`` visible CUDA devices."""
    import torch

    n = min(devices, torch.cuda.device_count())
    return float(min(torch.cuda.mem_get_info(i)[0] for i in range(max(n, 1))))


def free_bytes(plan: Plan) -> float:
    return available_ram() if plan.accelerator == "cpu" else free_gpu_memory(plan.devices)


def check_run(
    cfg: Any,
    vocab_size: int,
    free: Callable[[Plan], float] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Raise `MemoryCheckError` when the composed train config ``cfg`` cannot fit (see `check`); on a GPU
    say the estimate. Skipped with ``trainer.skip_memory_check=true``, and in the processes Lightning
    starts for the other local ranks (the first one checked for the whole node)."""
    if cfg.trainer.get("skip_memory_check", False) or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    plan = plan_from_config(cfg, vocab_size)
    if plan.accelerator != "cpu" and gpu_count() == 0:
        return  # Lightning says there is no GPU, in its own words
    available = (free or free_bytes)(plan)
    message = check(plan, available)
    if message is not None:
        raise MemoryCheckError(message)
    if plan.accelerator != "cpu":
        est = peak(plan)
        say(
            f"memory: estimated peak {_size(est.total)} per GPU (at the {est.peak}; llmforge.estimate), "
            f"{_size(available)} free"
        )
