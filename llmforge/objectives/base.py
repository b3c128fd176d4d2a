"""What every objective shares: optimizer, LR schedule, logging, validation, FSDP wrapping."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial, wraps
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from llmforge.config import DECAY_SHAPES, SCHEDULES, OptimConfig
from llmforge.models.transformer import Block, DecoderBlock, TransformerConfig, flops_per_token
from llmforge.objectives.loss import HeadLoss, chunked_loss, logits_loss


def decay_curve(progress: float, shape: str) -> float:
    """1 -> 0 as progress p goes 0 -> 1: ``linear`` 1 - p, ``cosine`` (1 + cos(pi p)) / 2, ``1-sqrt``
    1 - sqrt(p) (Hägele et al. 2024: better than linear for cooldowns)."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"optim.decay_shape={shape!r} is not one of {', '.join(DECAY_SHAPES)}")


def lr_factor(
    step: int,
    *,
    warmup: int,
    total: int,
    schedule: str,
    min_ratio: float,
    decay_start: int | None = None,
    decay_shape: str = "linear",
) -> float:
    """Multiplier of the peak LR at optimizer step `step`: linear warmup, then

    - ``cosine`` / ``linear``: decay from the end of warmup to ``min_ratio`` at ``total``;
    - ``constant``: the peak;
    - ``wsd`` and ``wsd_decay`` (warmup-stable-decay): the peak until ``decay_start``, then a decay of shape
      ``decay_shape`` to ``min_ratio`` at ``total``; before ``decay_start`` it is ``constant``.
    After ``total`` the factor stays at its final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule in ("wsd", "wsd_decay"):
        start = total if decay_start is None else max(decay_start, warmup)
        if step < start or total <= start:
            return 1.0
        progress = min(1.0, (step - start) / (total - start))
        return min_ratio + (1.0 - min_ratio) * decay_curve(progress, decay_shape)
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = "cosine" if schedule == "cosine" else "linear"
    return min_ratio + (1.0 - min_ratio) * decay_curve(progress, shape)


def wsd_decay_start(total: int, decay_fraction: float) -> int:
    """First step of the decay of ``schedule=wsd``: the last ``decay_fraction`` of ``total`` steps decay."""
    return total - round(decay_fraction * total)


def param_groups(
    model: nn.Module, weight_decay: float, lr: float | None = None, width_mult: float = 1.0
) -> list[dict]:
    """Weight decay on matmul weights only: none on norms, biases and embeddings.

    With µP (``width_mult`` != 1, `TransformerConfig.width_mult`), the matrices inside the transformer
    blocks (hidden weights: their fan-in grows with the width) form a third group trained at ``lr /
    width_mult``; the embedding, the head and the vectors keep ``lr``.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden_ids = set()
    if width_mult != 1.0:
        if lr is None:
            raise ValueError("param_groups needs the peak lr to scale µP's hidden LR")
        blocks = (m for m in model.modules() if isinstance(m, Block | DecoderBlock))
        hidden_ids = {id(p) for b in blocks for p in b.parameters() if p.dim() >= 2}
    decay, hidden, no_decay, seen = [], [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in hidden_ids:
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if width_mult != 1.0:
        groups.insert(1, {"params": hidden, "weight_decay": weight_decay, "lr": lr / width_mult})
    return groups


def require_special_tokens(special_tokens: dict[str, int], needed: dict[str, str], objective: str) -> None:
    """Raise a ValueError that says what is missing and why, and how to get a tokenizer that has it.

    ``needed``: special-token name (as in the shard manifest: ``mask``, ``sentinel_0``, ...) -> its use.
    """
    missing = [name for name in needed if name not in special_tokens]
    if missing:
        uses = "; ".join(f"{name}: {needed[name]}" for name in missing)
        raise ValueError(
            f"objective={objective} needs the special tokens {missing} ({uses}), which the data's tokenizer "
            f"lacks (it has {sorted(special_tokens, key=_natural)[:12]}...): rebuild the shards with "
            "`python -m llmforge.prepare`, whose tokenizer reserves <mask> and the sentinels <extra_id_i>"
        )


def _natural(name: str) -> tuple[str, int]:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


class PretrainModule(L.LightningModule):
    """Base LightningModule. Subclasses give `build_model`, `collate_fn` and `loss`.

    ``data`` describes the token shards the run trains on, as `llmforge.training.build_module` passes it:
    ``path``, ``seq_len`` (window length), ``vocab_size`` (the tokenizer's, before rounding up for the
    model), ``seed`` (data.seed), ``document_mask`` and ``document_positions`` (`document_options`).
    Objectives whose collate depends on them (masking, span lengths) check them, and the special tokens
    they need, in ``__init__``: before any training step.

    ``fused_ce``: the head and the cross-entropy run chunk by chunk over the tokens, without the logits of
    the whole micro-batch (`llmforge.objectives.loss`); ``z_loss``: weight of the log-partition penalty.
    An objective's ``loss`` returns what is minimised (cross-entropy + z-loss) with the ``z_loss`` term
    among its extra metrics; ``train/loss`` and ``val/loss`` are the cross-entropy.
    """

    metric_names: tuple[str, ...] = ()  # keys of `loss`'s extra metrics that validation averages too

    def __init__(
        self,
        model: dict,
        optim: dict,
        special_tokens: dict[str, int],
        name: str = "",
        data: dict | None = None,
        fused_ce: bool = True,
        z_loss: float = 0.0,
    ) -> None:
        if z_loss < 0:
            raise ValueError(f"objective.z_loss={z_loss} must be >= 0")
        super().__init__()
        self.save_hyperparameters()
        self.fused_ce, self.z_loss = bool(fused_ce), float(z_loss)
        self.model_cfg = TransformerConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.special_tokens = dict(special_tokens)
        self.data_info = dict(data or {})
        if self.data_info.get("document_mask"):
            require_special_tokens(
                self.special_tokens, {"eos": "data.document_mask (documents end with it)"}, objective=name
            )
        self.model = self.build_model()
        self.val_loss = MeanMetric()
        self.val_metrics = nn.ModuleDict({k: MeanMetric() for k in self.metric_names})
        # a mixture: validation loader i is source i (sorted names); name -> training weight
        self.val_sources: dict[str, float] = dict(self.data_info.get("sources") or {})
        self.source_nats = nn.ModuleDict({k: SumMetric() for k in self.val_sources})
        self.source_tokens = nn.ModuleDict({k: SumMetric() for k in self.val_sources})
        self.source_bytes = nn.ModuleDict({k: SumMetric() for k in self.val_sources})
        self._token_bytes: torch.Tensor | None = None

    # -- what an objective defines -------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError  # abstract: each objective builds its network

    def collate_fn(self) -> Callable[[list[dict]], dict]:
        raise NotImplementedError  # abstract: each objective owns its collate function

    def loss(self, batch: dict) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        """(loss to minimise, number of scored tokens, extra metrics: ``z_loss``, ...)."""
        raise NotImplementedError  # abstract

    def document_options(self) -> dict:
        """Collate arguments for ``data.document_mask``: the EOS id that ends documents and whether RoPE
        positions restart per document (``data.document_positions=reset``); {} without masking."""
        if not self.data_info.get("document_mask"):
            return {}
        return {
            "document_eos_id": self.special_tokens["eos"],
            "reset_positions": self.data_info.get("document_positions", "continue") == "reset",
        }

    def head_loss(self, labels: torch.Tensor, accuracy: bool = False) -> Callable[..., HeadLoss]:
        """The head and its loss against ``labels``, as the ``head`` of the model's forward
        (`llmforge.models.transformer.apply_head`): it runs inside the forward, where FSDP has gathered the
        head's weight. Chunked (``fused_ce``) or through the logits of all tokens."""

        def loss(hidden: torch.Tensor, head: nn.Linear) -> HeadLoss:
            if self.fused_ce:
                return chunked_loss(hidden, head.weight, labels, z_loss=self.z_loss, accuracy=accuracy)
            return logits_loss(head(hidden), labels, z_loss=self.z_loss, accuracy=accuracy)

        return loss

    @staticmethod
    def loss_metrics(result: HeadLoss) -> dict[str, torch.Tensor]:
        return {"z_loss": result.z_loss}

    @staticmethod
    def cross_entropy(loss: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cross-entropy part of ``loss``: the loss minus the z-loss term when there is one (so that
        whatever happened to the minimised loss, a NaN say, shows in ``train/loss`` too)."""
        z = extra.get("z_loss")
        return loss.detach() if z is None else loss.detach() - z

    # -- what the throughput callback counts -------------------------------------------------------
    def tokens_in_batch(self, batch: dict) -> int:
        """Tokens of the corpus this batch consumes (what tokens/s counts)."""
        return batch["input_ids"].numel()

    def flops_per_token(self, batch: dict) -> float:
        """Training FLOPs per token counted by `tokens_in_batch` (PaLM formula; for MFU)."""
        return flops_per_token(self.model_cfg, batch["input_ids"].shape[1])

    # -- shared training logic -------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, _, extra = self.loss(batch)
        ce = self.cross_entropy(loss, extra)  # exactly the loss without a z-loss (x - 0.0 == x)
        extra = dict(extra)
        z = extra.pop("z_loss", None)
        self.last_train_loss = loss.detach()  # for the stability guard (before AMP scaling)
        self.log("train/loss", ce, prog_bar=True)
        self.log("train/ppl", torch.exp(ce.float().clamp(max=30)))
        if self.z_loss > 0 and z is not None:
            self.log("train/z_loss", z)
        for key, value in extra.items():
            self.log(f"train/{key}", value)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss, n_tokens, extra = self.loss(batch)
        ce = self.cross_entropy(loss, extra)
        self.val_loss.update(ce.float(), weight=n_tokens)
        for key, metric in self.val_metrics.items():
            metric.update(extra[key].detach().float(), weight=n_tokens)
        if self.val_sources:
            name = list(self.val_sources)[dataloader_idx]
            self.source_nats[name].update(ce.double() * n_tokens)  # cross-entropy, without the z-loss
            self.source_tokens[name].update(float(n_tokens))
            self.source_bytes[name].update(self.scored_bytes(batch))

    def scored_bytes(self, batch: dict) -> torch.Tensor:
        """UTF-8 bytes of the batch's scored tokens (``labels`` other than -100), for bits per byte."""
        if self._token_bytes is None:
            from llmforge.data.shards import TOKENIZER_FILE
            from llmforge.evaluation import token_bytes

            path = Path(self.data_info["path"]) / TOKENIZER_FILE
            self._token_bytes = torch.from_numpy(token_bytes(path, self.model_cfg.vocab_size))
        labels = batch["labels"]
        scored = labels[labels != -100].cpu()
        return self._token_bytes[scored].sum().double()

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        value = self.val_loss.compute()
        self.val_loss.reset()
        if self.val_sources:
            value = self.log_sources(value)
        # MeanMetric already reduced across ranks; sync_dist only averages identical values
        self.log("val/loss", value, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(value.clamp(max=30)), sync_dist=True)
        for key, metric in self.val_metrics.items():
            self.log(f"val/{key}", metric.compute(), sync_dist=True)
            metric.reset()

    def log_sources(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logs ``val/<source>/loss``, ``/ppl`` and ``/bpb`` (bits per byte: the sum of nats / ln 2 / the
        UTF-8 bytes of the scored tokens, comparable across tokenizers); returns the mixture's ``val/loss``:
        the sources' losses weighted by their training weights (of the sources validated)."""
        total, weights = pooled.new_zeros(()), 0.0
        for name, weight in self.val_sources.items():
            nats, tokens, nbytes = (
                m[name].compute() for m in (self.source_nats, self.source_tokens, self.source_bytes)
            )
            for m in (self.source_nats, self.source_tokens, self.source_bytes):
                m[name].reset()
            if tokens <= 0:
                continue
            loss = (nats / tokens).float()
            self.log(f"val/{name}/loss", loss, sync_dist=True)
            self.log(f"val/{name}/ppl", torch.exp(loss.clamp(max=30)), sync_dist=True)
            if nbytes > 0:
                self.log(f"val/{name}/bpb", (nats / math.log(2) / nbytes).float(), sync_dist=True)
            total = total + weight * loss
            weights += weight
        return total / weights if weights else pooled

    def total_steps(self) -> int:
        o = self.optim_cfg
        if o.schedule == "wsd_decay":
            return self.decay_start() + int(o.cooldown_steps or 0)
        if o.decay_steps:
            return o.decay_steps
        return int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 0

    def decay_start(self) -> int | None:
        """First step of the decay: ``wsd``, the last ``optim.decay_fraction`` of the steps; ``wsd_decay``
        (a cooldown branch), ``optim.decay_start`` (the branch checkpoint's step, see `llmforge.branch`)."""
        o = self.optim_cfg
        if o.schedule == "wsd_decay":
            if o.decay_start is None:
                raise ValueError("optim.schedule=wsd_decay needs branch_from=CKPT (or optim.decay_start)")
            return o.decay_start
        if o.schedule == "wsd":
            if o.decay_start is None:
                return wsd_decay_start(self.total_steps(), o.decay_fraction)
            return o.decay_start
        return None

    def lr_lambda(self) -> Callable[[int], float]:
        """The LR multiplier of every step (`lr_factor` with this run's ``optim`` keys)."""
        o = self.optim_cfg
        return partial(
            lr_factor,
            warmup=o.warmup_steps,
            total=self.total_steps(),
            schedule=o.schedule,
            min_ratio=o.min_lr_ratio,
            decay_start=self.decay_start(),
            decay_shape=o.decay_shape,
        )

    def configure_optimizers(self) -> dict:
        o = self.optim_cfg
        groups = param_groups(self.model, o.weight_decay, o.lr, self.model_cfg.width_mult)  # µP: LR per group
        optimizer = torch.optim.AdamW(
            groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, **adamw_kernel(groups, self._precision())
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if getattr(self, "compile_blocks", False) and not hasattr(self, "_first_step_start"):
            self._first_step_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        """With ``strategy.compile``: the first training step's time, compilation included (a log line and
        ``perf/first_step_s``); the steady step time is ``perf/step_time_s``."""
        start = getattr(self, "_first_step_start", None)
        if start is None or getattr(self, "_first_step_logged", False):
            return
        self._first_step_logged = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        rank_zero_info(f"torch.compile: the first training step took {seconds:.1f} s (compilation included)")
        # at the step's 0-based index, as the per-step tags: global_step has moved past it once the optimizer
        # stepped (not yet after gradient accumulation's first micro-batch)
        if self.logger is not None:
            self.logger.log_metrics({"perf/first_step_s": seconds}, step=max(self.global_step - 1, 0))

    def _precision(self) -> str:
        trainer = self._trainer
        return str(trainer.precision) if trainer is not None else "32-true"

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it would unscale fp16
        gradients itself); without a gradient scaler (bf16) there is nothing to unscale, and the gradients
        are clipped here as Lightning's plain precision does."""
        inner = getattr(optimizer, "_optimizer", optimizer)
        fused = any(g.get("fused") for g in inner.param_groups)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if not (fused and gradient_clip_val and scaler is None):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for g in inner.param_groups for p in g["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_model(self) -> None:
        """Per transformer block (encoder and decoder blocks alike), in torchtitan's order: float8 linear
        layers (``precision=fp8-mixed``, `llmforge.fp8`), activation
        checkpointing (``strategy.activation_checkpointing``), ``torch.compile`` (``strategy.compile``),
        then under ``strategy=fsdp`` (ModelParallelStrategy) FSDP2 ``fully_shard`` with the mixed-precision
        policy of the run's precision; then the root. Parameter names stay as they are, so checkpoints are
        interchangeable between runs with and without these switches."""
        if getattr(self, "_model_configured", False):
            return  # Lightning calls the hook again for validate/test: wrap once
        self._model_configured = True
        blocks = [m for m in self.model.modules() if isinstance(m, Block | DecoderBlock)]
        mesh = getattr(self, "device_mesh", None)
        if getattr(self, "float8", False):
            from llmforge.fp8 import convert_to_float8

            convert_to_float8(self.model, fsdp=mesh is not None)
        for block in blocks:
            if getattr(self, "activation_checkpointing", False):
                checkpoint_activations(block)
            if getattr(self, "compile_blocks", False):
                compile_forward(block)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        trainer = self._trainer
        policy = fsdp_mixed_precision(str(trainer.precision) if trainer is not None else "32-true")
        reshard = bool(getattr(self, "fsdp_reshard_after_forward", True))
        dp_mesh = mesh["data_parallel"]
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)
        fully_shard(self.model, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=policy)


FUSED_ADAMW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adamw_kernel(groups: list[dict], precision: str) -> dict[str, bool]:
    """AdamW's implementation: ``fused`` (one kernel for all parameters) when every parameter is a CUDA
    tensor of a dtype it takes and no fp16 gradient scaler is in the way (``16-mixed``: Lightning unscales
    before clipping, which fused AdamW would do inside its step); ``foreach`` (multi-tensor) elsewhere."""
    params = [p for g in groups for p in g["params"]]
    fused = (
        bool(params)
        and precision != "16-mixed"
        and all(p.is_cuda and p.dtype in FUSED_ADAMW_DTYPES for p in params)
    )
    return {"fused": True} if fused else {"foreach": True}


def checkpoint_activations(block: nn.Module) -> None:
    """Activation checkpointing: the block keeps only its inputs in forward and recomputes its activations
    in backward (non-reentrant ``torch.utils.checkpoint`` around its ``forward``). Wraps from outside: the
    module tree and parameter names are unchanged, and FSDP's hooks stay outside the recomputed region."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    @wraps(forward)
    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def compile_forward(block: nn.Module) -> None:
    """``torch.compile`` the block's forward (its checkpointed forward, when both are on). All blocks share
    one compiled graph; module hooks (FSDP's all-gather and reshard) run eagerly around it. On CPU the
    inductor backend needs a C++ compiler."""
    block.forward = torch.compile(block.forward)


def fsdp_mixed_precision(precision: str):
    """FSDP2 `MixedPrecisionPolicy` for a Lightning precision.

    - ``bf16-mixed``: sharded parameters and optimizer state stay fp32; each block's parameters are
      all-gathered in bf16 and computed in bf16; gradients are reduce-scattered in fp32.
    - ``16-mixed``: the same with fp16 (GPU; Lightning's ModelParallelStrategy refuses it today).
    - ``bf16-true``: parameters are bf16 already (Lightning converts the module); gradients are
      reduce-scattered in fp32 for an exact sum, then stored in bf16.
    - ``32-true``: no casting.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "16-mixed"):
        half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    if precision == "bf16-true":
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()
