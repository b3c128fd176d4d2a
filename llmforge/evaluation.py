"""Loss, perplexity and bits per byte of a checkpoint on token shards (``python -m llmforge.evaluate``).

The numbers are the trainer's: the objective is rebuilt from the checkpoint's hyper-parameters and scores the
split with its own collate function and loss, so MLM masking and span corruption use the same seeded draws
(``data.seed``, the window indices of each batch) as the trainer's validation, on the same windows
(``PackedWindows`` of ``data.seq_len``, in order), in batches of the run's ``data.batch_size`` (read from the
run's ``config.yaml`` next to ``checkpoints/``; ``data.batch_size=`` overrides; it matters for MLM and
denoising, whose draws are seeded per batch).

Weighting, as the trainer's ``val/loss`` (a ``MeanMetric`` of each batch's mean loss weighted by its scored
tokens): the mean over all scored tokens of the split. Scored tokens are the next-token targets (clm), the
selected tokens (mlm), the target tokens (denoise: spans, sentinels and EOS). ``ppl = exp(loss)``.
Bits per byte: ``bpb = total nats / ln 2 / total UTF-8 bytes of the scored tokens``; each token's byte count
comes from the byte-level vocabulary (special tokens, EOS included, count 0 bytes, so their nats are charged
to the text around them). For clm this is the usual tokenizer-independent figure; for mlm and denoise it is
over the masked / target tokens only.

``trainer.limit_val_batches=N`` (or ``--limit-batches N``) scores the first N batches, as the trainer's
validation does; by default the whole split. (A run validated on N ranks scored each rank's contiguous
share of the windows, ``len // N`` each, in its own batches: its ``val/loss`` can differ slightly from this
one-process figure.) A JSON file holds the result (``--out``; default
``<run dir>/eval/<checkpoint>-<split>.json``).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from llmforge.data.dataset import PackedWindows
from llmforge.data.shards import TOKENIZER_FILE, ShardSet, read_manifest
from llmforge.fp8 import lightning_precision

IGNORE_INDEX = -100
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


def token_bytes(tokenizer_path: str | Path, size: int) -> np.ndarray:
    """UTF-8 bytes of each id of a byte-level BPE vocabulary (each character of a token stands for one
    byte); special (added) tokens and ids past the vocabulary count 0."""
    from tokenizers import Tokenizer, pre_tokenizers

    tok = Tokenizer.from_file(str(tokenizer_path))
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    table = np.zeros(size, dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= size or token in added:
            continue
        if all(c in alphabet for c in token):
            table[i] = len(token)
        else:  # not byte-level: decode the token alone
            table[i] = len(tok.decode([i]).encode("utf-8"))
    return table


def run_config(file: Path) -> dict:
    """The run's resolved config (``<run dir>/config.yaml``) when the checkpoint sits in a run dir."""
    for candidate in (file.parent.parent / "config.yaml", file.parent / "config.yaml"):
        if candidate.is_file():
            from omegaconf import OmegaConf

            return OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
    return {}


def _autocast(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    module,
    data_path: str | Path,
    *,
    split: str = "val",
    batch_size: int = 8,
    limit_batches: int | None = None,
    device: str | torch.device = "cpu",
    precision: str = "32-true",
    progress: bool = True,
) -> dict:
    """Score ``split`` of the shard set at ``data_path`` with the module's own collate and loss."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from torch.utils.data import DataLoader

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    data_path = Path(data_path)
    manifest = read_manifest(data_path)
    if split not in manifest["splits"]:
        raise ValueError(f"data={data_path} has no split {split!r} (it has {sorted(manifest['splits'])})")
    seq_len = int(module.data_info["seq_len"])
    windows = PackedWindows(ShardSet.open(data_path, split), seq_len)
    loader = DataLoader(windows, batch_size=batch_size, collate_fn=module.collate_fn())
    n_batches = len(loader) if not limit_batches else min(limit_batches, len(loader))
    if n_batches == 0:
        raise ValueError(f"split {split!r} of {data_path} holds no window of data.seq_len={seq_len}")
    device = torch.device(device)
    module.to(device)
    if precision == "bf16-true":
        module.to(torch.bfloat16)
    nbytes = token_bytes(data_path / TOKENIZER_FILE, module.model_cfg.vocab_size)
    nats, tokens, total_bytes, extra_sums = 0.0, 0, 0, {}
    start = time.perf_counter()
    bar = Progress(
        TextColumn("eval {task.fields[split]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("eval", total=n_batches, split=split, loss="-")
        for i, batch in enumerate(loader):
            if i == n_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(precision, device):
                loss, n, extra = module.loss(batch)
            loss = loss - extra.get("z_loss", 0.0)  # the cross-entropy, without a z-loss penalty
            nats += float(loss) * n
            tokens += n
            for key in module.metric_names:
                extra_sums[key] = extra_sums.get(key, 0.0) + float(extra[key]) * n
            labels = batch["labels"]
            total_bytes += int(nbytes[labels[labels != IGNORE_INDEX].cpu().numpy()].sum())
            bar.update(task, advance=1, loss=f"{nats / max(tokens, 1):.4f}")
    if tokens == 0:
        raise ValueError("no token was scored")
    mean = nats / tokens
    result = {
        "loss": mean,
        "ppl": math.exp(min(mean, 30.0)),  # the trainer clamps at 30 too
        "bpb": nats / math.log(2) / total_bytes if total_bytes else None,
        **{key: value / tokens for key, value in extra_sums.items()},
        "tokens_scored": tokens,
        "bytes": total_bytes,
        "batches": n_batches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "split": split,
        "data": str(data_path),
        "precision": precision,
        "seconds": time.perf_counter() - start,
    }
    return result


def evaluate_sources(module, sources: dict[str, str | Path], weights: dict[str, float], **kwargs) -> dict:
    """A mixture's checkpoint on each source's split (`evaluate` per source), and the sources' losses
    weighted by their training weights (``loss``, the trainer's ``val/loss`` of a mixture)."""
    per_source = {name: evaluate(module, path, **kwargs) for name, path in sorted(sources.items())}
    total = sum(weights.get(name, 0.0) for name in per_source)
    if total <= 0:
        raise ValueError(f"no training weight for the sources {sorted(per_source)}")
    loss = sum(weights.get(name, 0.0) * r["loss"] for name, r in per_source.items()) / total
    first = next(iter(per_source.values()))
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 30.0)),
        "bpb": None,  # per source only: bytes differ between sources
        "sources": per_source,
        "weights": {name: weights.get(name, 0.0) / total for name in per_source},
        "tokens_scored": sum(r["tokens_scored"] for r in per_source.values()),
        "batches": sum(r["batches"] for r in per_source.values()),
        "split": first["split"],
        "precision": first["precision"],
    }


def evaluate_run(
    checkpoint: str | Path,
    data: str | None = None,
    *,
    seq_len: int | None = None,
    split: str | None = None,
    batch_size: int | None = None,
    limit_batches: int | None = None,
    device: str = "cpu",
    precision: str | None = None,
    progress: bool = True,
) -> tuple[Path, dict]:
    """``python -m llmforge.evaluate``: the checkpoint file and its scores on ``data`` (default: the run's
    data; a mixture run: every source on its own and the weighted loss), with the run's batch size and
    precision unless given."""
    from llmforge.checkpoints import checkpoint_file, load_module

    file = checkpoint_file(checkpoint)
    run_cfg = run_config(file)
    path = data or (run_cfg.get("data") or {}).get("path")
    module = load_module(file, data, seq_len)
    sources = {} if data else (module.data_info.get("sources") or {})
    path = path or module.data_info.get("path")
    if not path and not sources:
        raise ValueError("no data directory: pass data=DIR")
    batch_size = batch_size or (run_cfg.get("data") or {}).get("batch_size") or 8
    precision = precision or (run_cfg.get("precision") or {}).get("value") or "32-true"
    precision = lightning_precision(precision)  # an fp8-mixed run is scored in bf16-mixed
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    common = {
        "split": split or "val",
        "batch_size": int(batch_size),
        "limit_batches": limit_batches,
        "device": device,
        "precision": precision,
        "progress": progress,
    }
    if sources:
        paths = {name: spec["path"] for name, spec in (run_cfg["data"].get("sources") or {}).items()}
        return file, evaluate_sources(module, {n: paths[n] for n in sources}, sources, **common)
    return file, evaluate(module, path, **common)
