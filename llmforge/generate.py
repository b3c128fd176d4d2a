"""python -m llmforge.generate CKPT --prompt "..." [--prompt ...]: read what a trained model writes.

One command for the three objectives, dispatched on the checkpoint's objective (or ``--mode``):

- ``clm``: continue each prompt: greedy (``--greedy`` or ``--temperature 0``) or sampled (temperature, top-k,
  top-p, ``--seed``), up to ``--max-new-tokens``, stopping at EOS. A batch of prompts is left-padded; each row
  keeps its own RoPE positions and a key mask, so a prompt gives the same greedy tokens alone or in a batch.
  A KV cache (`llmforge.models.transformer.KVCache`) makes each new token cost one position (``--no-cache``
  recomputes the whole prefix every step, for comparison).
- ``mlm``: fill every ``<mask>`` of the prompt: the top ``--top-k`` candidates with their probabilities.
- ``denoise``: fill the sentinels ``<extra_id_0>``, ``<extra_id_1>``, ... of the prompt: the encoder reads the
  prompt (+ EOS, as in training), the decoder writes the target (sentinel, span, sentinel, span, ..., EOS)
  greedily or sampled, and each sentinel's span is cut out of it. A model trained with ``variant=infill``
  writes the whole text back instead, with its ``<mask>`` spans filled.

CKPT is a Lightning checkpoint (``runs/x/checkpoints/last.ckpt``, or the run dir itself: its
``checkpoints/last.ckpt``), a consolidated FSDP checkpoint (``python -m llmforge.consolidate``: the same
format), or a Hugging Face Llama directory (``config.json`` + safetensors, as ``python -m llmforge.export``
writes it). The model config comes from the checkpoint's ``hyper_parameters``; the tokenizer from the data
directory recorded there (``data.path``/tokenizer.json; ``--tokenizer`` overrides), or the HF directory's
``tokenizer.json``.

A causal prompt is read as the start of a document: it is preceded by EOS, as every document but the first
is in the packed training stream (``--no-eos-prefix`` turns that off).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmforge.models.transformer import Encoder, EncoderDecoder, KVCache, Transformer, TransformerConfig

OBJECTIVES = ("clm", "mlm", "denoise")
# what torch.compile, activation checkpointing and FSDP1 put into parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# -- loading ---------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready to generate (eval mode), with what it needs around it."""

    model: nn.Module
    objective: str  # clm | mlm | denoise
    special_tokens: dict[str, int]
    tokenizer: Any = None  # tokenizers.Tokenizer, or None when none was found
    hparams: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_limit(self) -> int | None:
        """Ids at or above this are vocabulary padding (the model's vocab is rounded up): never produced."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True) if self.tokenizer is not None else None


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file from a path: the file itself, or a run directory's ``checkpoints/last.ckpt``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if path.is_dir():
        candidates = (path / "checkpoints" / "last.ckpt", path / "last.ckpt")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        for candidate in (path, *candidates):
            if (candidate / ".metadata").is_file() or (candidate / "meta.pt").is_file():
                raise ValueError(
                    f"{candidate} is a sharded (distributed) checkpoint: write one file first with "
                    f"`python -m llmforge.consolidate {candidate}` and pass that file"
                )
        raise FileNotFoundError(
            f"{path} holds no checkpoint (checkpoints/last.ckpt) nor a Hugging Face config.json"
        )
    return path


def objective_of(hparams: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """clm, mlm or denoise, from the objective's knobs in the hyper-parameters (and the weights' names)."""
    if "noise_density" in hparams or any(k.startswith("model.encoder.") for k in state_dict):
        return "denoise"
    if "mask_prob" in hparams:
        return "mlm"
    return "clm"


def model_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's weights from a LightningModule state dict: ``model.`` prefix (and the wrappers'
    ``_orig_mod.``, ``_checkpoint_wrapped_module.``, ``_fsdp_wrapped_module.``) removed, everything else
    (metrics, ...) left out."""
    out = {}
    for key, value in state_dict.items():
        if not key.startswith("model."):
            continue
        key = key[len("model.") :]
        for wrapper in WRAPPER_PREFIXES:
            key = key.replace(wrapper, "")
        out[key] = value
    if not out:
        raise ValueError("the checkpoint's state_dict has no 'model.*' weights: not an llmforge checkpoint")
    return out


def build_network(objective: str, cfg: TransformerConfig) -> nn.Module:
    if objective not in OBJECTIVES:
        raise ValueError(f"mode={objective!r} is not one of {', '.join(OBJECTIVES)}")
    return {"clm": Transformer, "mlm": Encoder, "denoise": EncoderDecoder}[objective](cfg)


def find_tokenizer(hparams: dict, ckpt: Path, override: str | Path | None) -> Any:
    """The training data's tokenizer: ``override``, else ``data.path``/tokenizer.json as recorded, resolved
    from the working directory or from the run directory's parent (runs/x/checkpoints/y.ckpt -> ./)."""
    from tokenizers import Tokenizer

    if override is not None:
        path = Path(override)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--tokenizer {override}: no tokenizer.json there")
        return Tokenizer.from_file(str(path))
    data = (hparams.get("data") or {}).get("path")
    if not data:
        return None
    candidates = [Path(data)]
    if not Path(data).is_absolute():
        candidates += [parent / data for parent in ckpt.resolve().parents[:4]]
    for directory in candidates:
        if (directory / "tokenizer.json").is_file():
            return Tokenizer.from_file(str(directory / "tokenizer.json"))
    return None


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
    mode: str | None = None,
) -> LoadedModel:
    """Load a Lightning / consolidated checkpoint or a Hugging Face Llama directory for generation."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        loaded = load_hf_dir(path, tokenizer)
    else:
        file = checkpoint_file(path)
        ckpt = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        if "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise ValueError(f"{file} lacks 'state_dict' or 'hyper_parameters': not a Lightning checkpoint")
        hparams = dict(ckpt["hyper_parameters"])
        objective = objective_of(hparams, ckpt["state_dict"])
        cfg = TransformerConfig(**hparams["model"])
        model = build_network(objective, cfg)
        model.load_state_dict(model_weights(ckpt["state_dict"]), strict=True)
        loaded = LoadedModel(
            model,
            objective,
            dict(hparams["special_tokens"]),
            find_tokenizer(hparams, file, tokenizer),
            hparams,
        )
    if mode not in (None, "auto") and mode != loaded.objective:
        raise ValueError(f"--mode {mode} does not match the checkpoint's objective ({loaded.objective})")
    loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


def load_hf_dir(path: Path, tokenizer: str | Path | None = None) -> LoadedModel:
    """A Hugging Face LlamaForCausalLM directory -> an llmforge causal `Transformer` (`llmforge.hf.from_hf`);
    the tokenizer is the directory's ``tokenizer.json`` (as ``python -m llmforge.export`` writes it)."""
    from llmforge.hf import from_hf

    cfg, weights = from_hf(path)
    model = Transformer(cfg)
    model.load_state_dict(weights, strict=True)
    tok = find_tokenizer({"data": {"path": str(path)}}, path / "config.json", tokenizer)
    specials = hf_special_tokens(path, tok)
    return LoadedModel(model, "clm", specials, tok, {"model": vars(cfg), "source": str(path)})


def hf_special_tokens(path: Path, tok: Any) -> dict[str, int]:
    config = json.loads((path / "config.json").read_text())
    specials: dict[str, int] = {}
    if tok is not None:
        from llmforge.prep.tokenizer import CORE_SPECIALS

        for name, token in CORE_SPECIALS.items():
            if (i := tok.token_to_id(token)) is not None:
                specials[name] = i
    for name in ("eos", "bos", "pad"):
        value = config.get(f"{name}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            specials.setdefault(name, int(value))
    return specials


# -- sampling --------------------------------------------------------------------------------------
@dataclass
class Sampling:
    """temperature <= 0: greedy (argmax). Otherwise logits / temperature, then top-k (0: off) and top-p
    (nucleus; 1.0: off) filtering, then one draw from a seeded generator."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def next_tokens(
    logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) token ids."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > sampling.top_p  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A local generator: sampling never touches the global RNG (training streams stay as they are)."""
    return torch.Generator(device=device).manual_seed(seed)


# -- causal LM -------------------------------------------------------------------------------------
@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (token ids), up to ``max_new_tokens``; a row ends after its first EOS
    (which it includes). Rows are left-padded to the longest prompt; RoPE positions and the key mask are
    per row, so a row's greedy tokens do not depend on the others."""
    if not isinstance(model, Transformer) or not model.causal:
        raise ValueError("generate_ids needs a causal Transformer (objective=clm)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    sampling = sampling or Sampling()
    device = model.head.weight.device
    b, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len="
            f"{model.cfg.max_seq_len}"
        )
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = True
    tokens, mask = tokens.to(device), mask.to(device)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    next_pos = mask.long().sum(dim=1, keepdim=True)  # (b, 1): each row's next RoPE position
    padded = not bool(mask.all())
    generator = None if sampling.greedy else make_generator(seed, device)

    def last_logits(hidden: torch.Tensor) -> torch.Tensor:
        return model.head(model.norm(hidden[:, -1]))  # the head on the last position only

    def full_pass(seq: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
        """No cache: the whole prefix again (the training forward; a fresh cache when rows are padded)."""
        if not padded:
            return last_logits(model.trunk(seq))
        fresh = KVCache.for_model(model, b, seq.shape[1])
        pos = (seq_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return last_logits(model.trunk_cached(seq, fresh, pos, seq_mask))

    cache = KVCache.for_model(model, b, total) if use_cache else None
    if cache is not None:
        logits = last_logits(model.trunk_cached(tokens, cache, positions, mask if padded else None))
    else:
        logits = full_pass(tokens, mask)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        new = next_tokens(logits, sampling, generator, vocab_limit)
        out = torch.cat([out, new[:, None]], dim=1)
        if eos_id is not None:
            done |= new == eos_id
            if bool(done.all()):
                break
        if step == max_new_tokens - 1:
            break
        if cache is not None:
            logits = last_logits(model.trunk_cached(new[:, None], cache, next_pos))
            next_pos = next_pos + 1
        else:
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
            logits = full_pass(tokens, mask)
    rows = out.tolist()
    if eos_id is not None:
        rows = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]
    return rows


# -- masked LM -------------------------------------------------------------------------------------
@torch.no_grad()
def fill_mask_ids(
    model: Encoder,
    ids: list[int],
    mask_id: int,
    top_k: int = 5,
    exclude: list[int] | None = None,
    vocab_limit: int | None = None,
) -> list[list[tuple[int, float]]]:
    """For each ``mask_id`` position of ``ids`` (in order): the ``top_k`` (token id, probability) candidates.
    ``exclude``: ids never proposed (special tokens: they are never training targets)."""
    if not isinstance(model, Encoder):
        raise ValueError("fill-mask needs a masked-LM Encoder (objective=mlm)")
    tokens = torch.tensor([ids], dtype=torch.long, device=model.head.weight.device)
    where = (tokens[0] == mask_id).nonzero().flatten()
    if where.numel() == 0:
        raise ValueError("the prompt has no <mask> token to fill")
    logits = model(tokens, positions=where).float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits[:, vocab_limit:] = float("-inf")
    if exclude:
        logits[:, exclude] = float("-inf")
    probs = logits.softmax(dim=-1)
    values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]


# -- denoising -------------------------------------------------------------------------------------
@torch.no_grad()
def decode_ids(
    model: EncoderDecoder,
    ids: list[int],
    *,
    start_id: int,
    eos_id: int,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    vocab_limit: int | None = None,
) -> list[int]:
    """The encoder reads ``ids``; the decoder writes from ``start_id`` until EOS (included) or
    ``max_new_tokens``. The target is short: the decoder runs on the whole target each step (no cache)."""
    if not isinstance(model, EncoderDecoder):
        raise ValueError("fill-span needs an EncoderDecoder (objective=denoise)")
    sampling = sampling or Sampling()
    device = model.head.weight.device
    memory = model.encode(torch.tensor([ids], dtype=torch.long, device=device))
    generator = None if sampling.greedy else make_generator(seed, device)
    target = torch.tensor([[start_id]], dtype=torch.long, device=device)
    limit = min(max_new_tokens, model.cfg.max_seq_len - 1)
    for _ in range(limit):
        logits = model.decode(target, memory)[:, -1]
        new = next_tokens(logits, sampling, generator, vocab_limit)
        target = torch.cat([target, new[:, None]], dim=1)
        if int(new) == eos_id:
            break
    return target[0, 1:].tolist()


def split_spans(target: list[int], sentinel_ids: list[int], eos_id: int) -> dict[int, list[int]]:
    """A span-corruption target (s_0 span_0 s_1 span_1 ... EOS) -> {sentinel index: span ids}. Tokens before
    the first sentinel are dropped; a sentinel the decoder wrote more than once keeps its first span."""
    index_of = {sid: i for i, sid in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for token in target:
        if token == eos_id:
            break
        if token in index_of:
            current = index_of[token] if index_of[token] not in spans else None
            if current is not None:
                spans[current] = []
        elif current is not None:
            spans[current].append(token)
    return spans


# -- text level ------------------------------------------------------------------------------------
def _tokenizer(lm: LoadedModel) -> Any:
    if lm.tokenizer is None:
        raise ValueError(
            "no tokenizer found for this checkpoint (its data.path has no tokenizer.json from here): "
            "pass --tokenizer path/to/tokenizer.json (or the data directory)"
        )
    return lm.tokenizer


def encode(lm: LoadedModel, text: str) -> list[int]:
    return _tokenizer(lm).encode(text).ids


def decode(lm: LoadedModel, ids: list[int]) -> str:
    return _tokenizer(lm).decode(ids, skip_special_tokens=True)


def generate_text(
    lm: LoadedModel,
    prompts: list[str],
    max_new_tokens: int = 64,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
    use_cache: bool = True,
    eos_prefix: bool = True,
) -> list[dict]:
    """Continue each prompt: [{"prompt", "completion", "tokens", "stopped_at_eos"}]."""
    eos = lm.special_tokens.get("eos")
    prefix = [eos] if eos_prefix and eos is not None else []
    ids = [prefix + encode(lm, p) for p in prompts]
    rows = generate_ids(
        lm.model,
        ids,
        max_new_tokens,
        sampling=sampling,
        seed=seed,
        eos_id=eos,
        pad_id=lm.special_tokens.get("pad", 0),
        use_cache=use_cache,
        vocab_limit=lm.vocab_limit,
    )
    return [
        {
            "prompt": p,
            "completion": decode(lm, row),
            "tokens": row,
            "stopped_at_eos": eos is not None and bool(row) and row[-1] == eos,
        }
        for p, row in zip(prompts, rows, strict=True)
    ]


def fill_mask(lm: LoadedModel, prompt: str, top_k: int = 5) -> dict:
    """{"prompt", "masks": [[{"token", "id", "prob"}, ...] per <mask>], "filled": prompt with the top-1s}."""
    mask_id = lm.special_tokens["mask"]
    ids = encode(lm, prompt)
    candidates = fill_mask_ids(
        lm.model,
        ids,
        mask_id,
        top_k,
        exclude=sorted(set(lm.special_tokens.values())),
        vocab_limit=lm.vocab_limit,
    )
    tok = _tokenizer(lm)
    filled, it = [], iter(candidates)
    for i in ids:
        filled.append(next(it)[0][0] if i == mask_id else i)
    masks = [[{"token": tok.decode([i]), "id": i, "prob": p} for i, p in c] for c in candidates]
    return {"prompt": prompt, "masks": masks, "filled": decode(lm, filled)}


def fill_spans(
    lm: LoadedModel,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
) -> dict:
    """{"prompt", "spans": {"<extra_id_i>": text}, "filled": prompt with its sentinels replaced, "target"}.
    For ``variant=infill`` models, "filled" is the decoder's text and "spans" is empty."""
    specials = lm.special_tokens
    ids = encode(lm, prompt) + [specials["eos"]]
    start = specials[lm.hparams.get("decoder_start_token", "bos")]
    target = decode_ids(
        lm.model,
        ids,
        start_id=start,
        eos_id=specials["eos"],
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        vocab_limit=lm.vocab_limit,
    )
    tok = _tokenizer(lm)
    if lm.hparams.get("variant", "span") == "infill":
        return {"prompt": prompt, "spans": {}, "filled": decode(lm, target), "target": tok.decode(target)}
    sentinels = []
    while f"sentinel_{len(sentinels)}" in specials:
        sentinels.append(specials[f"sentinel_{len(sentinels)}"])
    spans = split_spans(target, sentinels, specials["eos"])
    filled: list[int] = []
    for i in ids[:-1]:
        filled.extend(spans.get(sentinels.index(i), []) if i in sentinels else [i])
    return {
        "prompt": prompt,
        "spans": {f"<extra_id_{k}>": tok.decode(v) for k, v in sorted(spans.items())},
        "filled": decode(lm, filled),
        "target": tok.decode(target, skip_special_tokens=False),
    }


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m llmforge.generate", description=__doc__.split("\n\n")[0].split(": ", 1)[-1]
    )
    p.add_argument("checkpoint", help="a .ckpt file, a run directory, or a Hugging Face Llama directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--mode", choices=("auto", *OBJECTIVES), default="auto", help="default: the checkpoint's")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument(
        "--top-k", type=int, default=50, help="clm/denoise: keep the k most likely (0: all); mlm: candidates"
    )
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every token")
    p.add_argument("--no-eos-prefix", action="store_true", help="do not start causal prompts with EOS")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokenizer", help="tokenizer.json (or its directory); default: the training data's")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        print("error: give at least one --prompt (or --prompt-file)", file=sys.stderr)
        return 2
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        lm = load_model(
            args.checkpoint, device=device, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer, mode=args.mode
        )
        sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
        if lm.objective == "clm":
            results = generate_text(
                lm,
                prompts,
                args.max_new_tokens,
                sampling=sampling,
                seed=args.seed,
                use_cache=not args.no_cache,
                eos_prefix=not args.no_eos_prefix,
            )
        elif lm.objective == "mlm":
            results = [fill_mask(lm, p, top_k=max(args.top_k, 1)) for p in prompts]
        else:
            results = [
                fill_spans(lm, p, args.max_new_tokens, sampling=sampling, seed=args.seed) for p in prompts
            ]
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r, ensure_ascii=False) if args.json else format_result(lm.objective, r))
    return 0


def format_result(objective: str, r: dict) -> str:
    if objective == "clm":
        return f"{r['prompt']}{r['completion']}\n" + "-" * 40
    lines = [r["prompt"]]
    if objective == "mlm":
        for k, cands in enumerate(r["masks"]):
            lines.append(f"  <mask> #{k}: " + ", ".join(f"{c['token']!r} {c['prob']:.3f}" for c in cands))
    else:
        lines += [f"  {s}: {text!r}" for s, text in r["spans"].items()]
    lines.append(f"  -> {r['filled']}\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
