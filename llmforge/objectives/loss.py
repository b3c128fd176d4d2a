"""The loss of every objective's head: cross-entropy over the scored tokens, plus an optional z-loss.

Two paths give the same numbers (within fp32 rounding):

- ``logits_loss``: the plain path. The model's head makes the logits of the whole micro-batch, then
  ``F.cross_entropy``. At a 32k-100k vocabulary and thousands of tokens per micro-batch the logits (and their
  fp32 copy, the log-probabilities and the gradient) are the largest tensors of the step.
- ``chunked_loss``: the fused linear + cross-entropy (``objective.fused_ce``). It takes the head's input
  (the normed hidden states) and the head's weight, and goes over the tokens in chunks: per chunk the
  logits, their log-sum-exp, the loss, and at once the gradient of the hidden states and the head weight
  (softmax minus one-hot, times the upstream scalar in backward). Only one chunk of logits ever exists, and
  the backward is two saved gradients scaled by the upstream gradient. The same three matmuls as the plain
  path. On CUDA, Liger-Kernel's Triton kernel of the same idea is used when it is installed
  (``pip install llmforge[gpu]``) and the objective needs no accuracy (``clm``); the torch path otherwise.

z-loss (PaLM; OLMo): ``z_loss * mean(logsumexp(logits)^2)`` over the scored tokens, which keeps the
softmax's normaliser near 1 (log near 0) and the logits from drifting. ``HeadLoss.loss`` is what is
minimised (cross-entropy + z-loss), ``ce`` and ``z_loss`` are what is logged (``train/loss``,
``train/z_loss``).

Labels equal to ``IGNORE_INDEX`` (-100) are not scored. Under autocast the head's matmul runs in the
autocast dtype and the softmax in fp32, as ``nn.Linear`` + ``logits.float()`` do.
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class HeadLoss(NamedTuple):
    loss: torch.Tensor  # minimised: mean cross-entropy + z-loss term (differentiable)
    ce: torch.Tensor  # mean cross-entropy over the scored tokens (detached)
    z_loss: torch.Tensor  # z_loss * mean(lse^2) over the scored tokens (detached; 0 when off)
    correct: torch.Tensor  # scored tokens whose argmax is the label (detached; 0 unless asked)
    count: torch.Tensor  # scored tokens


def logits_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, z_loss: float = 0.0, accuracy: bool = False
) -> HeadLoss:
    """Plain path: cross-entropy (and z-loss) of materialised logits (..., vocab) against labels (...)."""
    flat = logits.float().view(-1, logits.size(-1))
    target = labels.reshape(-1)
    ce = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX)
    valid = target != IGNORE_INDEX
    count = valid.sum()
    loss = ce
    z = torch.zeros((), device=flat.device)
    if z_loss > 0:
        lse = torch.logsumexp(flat, dim=-1)
        z = z_loss * (lse.square() * valid).sum() / count.clamp(min=1)
        loss = ce + z
    correct = torch.zeros((), dtype=torch.long, device=flat.device)
    if accuracy:
        with torch.no_grad():
            correct = ((flat.argmax(dim=-1) == target) & valid).sum()
    return HeadLoss(loss, ce.detach(), z.detach(), correct, count)


def default_chunk(tokens: int, vocab: int, dim: int) -> int:
    """Tokens per chunk: a chunk's logits about as large as the hidden states of the whole batch (Liger's
    rule), a power of two, at least 256 rows (matmuls stay efficient) and at most all tokens."""
    per_hidden = -(-tokens * dim // max(vocab, 1))
    chunk = 1 << max(per_hidden - 1, 0).bit_length()
    return max(1, min(tokens, max(256, chunk)))


class _ChunkedLinearCE(torch.autograd.Function):
    """(hidden (N, d), weight (V, d), labels (N,)) -> (loss, ce, z, correct); the gradients of hidden and
    weight are computed chunk by chunk in forward and scaled by the upstream gradient / count in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss: float, dtype: torch.dtype, chunk: int, accuracy: bool):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        denom = count.clamp(min=1).to(torch.float32)
        h, w = hidden.to(dtype), weight.to(dtype)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros_like(ce_sum)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            hc, lc, vc = h[start:end], labels[start:end], valid[start:end]
            logits = (hc @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            safe = lc.clamp(min=0).unsqueeze(1)
            ce_sum += ((lse - logits.gather(1, safe).squeeze(1)) * vc).sum()
            if z_loss > 0:
                z_sum += (lse.square() * vc).sum()
            if accuracy:
                correct += ((logits.argmax(dim=-1) == lc) & vc).sum()
            if not (want_h or want_w):
                continue
            # d/dlogits of ce_sum + z_loss * z_sum: softmax * (1 + 2 z lse) - onehot, per scored row. The
            # 1 / count of the mean is applied in backward, with the upstream gradient (fp16's loss scale):
            # divided here, entries below fp16's smallest subnormal would vanish in the 16-bit cast
            scale = vc.to(torch.float32)
            row = scale * (1.0 + 2.0 * z_loss * lse) if z_loss > 0 else scale
            grad = logits.sub_(lse.unsqueeze(1)).exp_().mul_(row.unsqueeze(1))
            grad.scatter_add_(1, safe, -scale.unsqueeze(1))
            grad = grad.to(dtype)
            if want_h:
                grad_h[start:end] = grad @ w
            if want_w:
                grad_w += (grad.t() @ hc).float()
            del logits, grad  # before the next chunk's logits exist
        ctx.denom = denom
        ce = ce_sum / denom
        z = z_loss * z_sum / denom
        ctx.save_for_backward(grad_h if want_h else torch.empty(0), grad_w if want_w else torch.empty(0))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, z, correct)
        return ce + z, ce, z, correct

    @staticmethod
    def backward(ctx, grad_loss, _ce, _z, _correct):
        grad_h, grad_w = ctx.saved_tensors
        factor = grad_loss / ctx.denom  # a 0-dim fp32 tensor: grad_h keeps its dtype
        dh = (grad_h * factor).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = (grad_w * factor).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None, None, None


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The head matmul's dtype: the autocast dtype when autocast is on for the device, else the weight's."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss: float = 0.0,
    accuracy: bool = False,
    chunk: int | None = None,
    use_liger: bool = True,
) -> HeadLoss:
    """Fused path: the loss of ``hidden (..., d) @ weight.T`` against ``labels (...)`` without the logits of
    all tokens at once. ``chunk``: tokens per chunk (default `default_chunk`)."""
    h = hidden.reshape(-1, hidden.size(-1))
    target = labels.reshape(-1)
    dtype = compute_dtype(h, weight)
    if not torch.is_grad_enabled():  # validation, evaluation: no gradient work (the Function would do it
        h, weight = h.detach(), weight.detach()  # for any input that requires grad, as the head's weight)
    if use_liger and h.is_cuda and not accuracy and liger_available():
        return _liger_loss(h, weight, target, z_loss, dtype)
    chunk = chunk or default_chunk(h.shape[0], weight.shape[0], h.shape[1])
    with torch.autocast(h.device.type, enabled=False):
        loss, ce, z, correct = _ChunkedLinearCE.apply(
            h, weight, target, float(z_loss), dtype, chunk, accuracy
        )
    return HeadLoss(loss, ce, z, correct, (target != IGNORE_INDEX).sum())


def _liger_loss(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, z_loss: float, dtype: torch.dtype
) -> HeadLoss:
    """Liger-Kernel's fused linear cross-entropy (Triton, CUDA): its loss is cross-entropy + z-loss."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    with torch.autocast("cuda", enabled=False):
        out = liger_fused_linear_cross_entropy(
            h.to(dtype),
            weight.to(dtype),
            target,
            ignore_index=IGNORE_INDEX,
            lse_square_scale=float(z_loss),
            return_z_loss=True,
        )
    if isinstance(out, tuple):
        loss, z = out[0], out[1]
    else:  # newer releases return an output object
        loss, z = out.loss, getattr(out, "z_loss", None)
    z = torch.zeros((), device=h.device) if z is None else z.detach().float()
    loss = loss.float()
    count = (target != IGNORE_INDEX).sum()
    return HeadLoss(loss, loss.detach() - z, z, torch.zeros((), dtype=torch.long, device=h.device), count)
