"""The gradient norm before clipping (``train/grad_norm``), global under FSDP2."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch


def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients together, as `torch.nn.utils.clip_grad_norm_` computes it (0 if none).

    Under FSDP2 the gradients are DTensor shards: the norm is reduced over the shards (``full_tensor``),
    so every rank gets the norm of the whole model's gradient, not of its own shard.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    if hasattr(norm, "full_tensor"):  # a DTensor: partial norms on each rank
        norm = norm.full_tensor()
    return norm


class GradNorm(L.Callback):
    """Logs ``train/grad_norm``: the total norm of the gradients before clipping, once per optimizer step.

    Lightning calls ``on_before_optimizer_step`` after the backward pass of the last micro-batch (and
    after AMP unscaling) and before it clips: the logged norm is the unclipped one, the figure to compare
    with ``trainer.gradient_clip_val``. Logged through ``self.log``, so ``trainer.log_every_n_steps``
    applies; the norm is only computed on the steps that are logged.
    """

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = float(norm_type)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        n = max(1, trainer.log_every_n_steps)
        if (trainer.global_step + 1) % n != 0:
            return
        norm = total_grad_norm(pl_module.parameters(), self.norm_type)
        pl_module.log("train/grad_norm", norm.float())
