"""Checkpoints on disk -> model config, weights, tokenizer and objective (and consolidation back to one file).

One home for every kind of checkpoint llmforge reads:

- a Lightning ``.ckpt`` file (``runs/x/checkpoints/last.ckpt``; or the run dir itself: its
  ``checkpoints/last.ckpt``), and a consolidated FSDP checkpoint (the same format);
- a sharded ``strategy=fsdp`` directory (torch.distributed.checkpoint's ``.metadata`` and ``*.distcp``
  plus Lightning's ``meta.pt``): `consolidate` writes it as one ordinary ``.ckpt`` file;
- a Hugging Face Llama directory (``config.json`` + safetensors), through `llmforge.hf.from_hf`.

**A checkpoint never runs code.** Every pickle llmforge reads is unpickled with an allow-list: `safe_load`
is ``torch.load(weights_only=True)`` (tensors, plain containers, numbers and strings; llmforge saves only
those, so no extra type is allowed), DCP's ``.metadata`` goes through `DCPMetadataUnpickler` (only
torch.distributed.checkpoint's metadata classes) and DCP's non-tensor items through ``weights_only=True``
too (`SafeLoadPlanner`). A file that holds anything else raises `CheckpointRefused`, one line naming the
file. `verify_for_resume` checks a file or directory this way before Lightning (which would unpickle
DCP metadata freely) is given it.
"""

from __future__ import annotations

import errno
import functools
import io
import json
import os
import pickle
import shutil
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmforge.models.transformer import Encoder, EncoderDecoder, Transformer, TransformerConfig

OBJECTIVES = ("clm", "mlm", "denoise")
# what torch.compile, activation checkpointing and FSDP1 put into parameter names
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
META_FILE = "meta.pt"  # Lightning's non-tensor part of a sharded checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
# Types beyond weights_only's defaults that llmforge's own checkpoints hold: none (it saves plain types:
# dicts, lists, numbers, strings, tensors). Extend only with data classes that run no code when built.
SAFE_GLOBALS: list[Any] = []


class CheckpointRefused(ValueError):
    """A checkpoint file that holds more than tensors and plain data: loading it could run code."""


# -- safe loading ------------------------------------------------------------------------------------------
def safe_load(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``: tensors and plain data only.
    A pickle that names anything else raises `CheckpointRefused`; an unreadable file ValueError."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # mmap needs torch.save's zip format
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointRefused(refusal(path, err)) from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({first})") from None


def refusal(path: Path, err: Exception) -> str:
    """One line: the file, and the first global the unpickler refused when its message names one."""
    text = " ".join(str(err).split())
    what = ""
    for marker in ("Unsupported global: GLOBAL ", "Unsupported global ", "unsupported global "):
        if marker in text:
            what = text.split(marker, 1)[1].split(" ", 1)[0].rstrip(".,:")
            break
    detail = f" ({what})" if what else ""
    return (
        f"{path}: refused to load: it holds objects other than tensors and plain data{detail}; "
        "a checkpoint must never run code"
    )


class DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint's ``.metadata`` (which torch itself reads with a plain
    ``pickle.load``): only DCP's metadata records and the torch types they hold; any other global is
    refused."""

    ALLOWED = {
        *(
            ("torch.distributed.checkpoint.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "ChunkStorageMetadata",
                "BytesStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in self.ALLOWED and not dtype:
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")
        return super().find_class(module, name)


def read_dcp_metadata(directory: Path) -> Any:
    path = directory / DCP_METADATA
    try:
        with open(path, "rb") as f:
            return DCPMetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointRefused(refusal(path, err)) from None
    except (EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a readable checkpoint index ({err})") from None


@functools.cache
def _dcp_classes() -> tuple[type, type]:
    """A `FileSystemReader` that reads the metadata with `DCPMetadataUnpickler`, and a `DefaultLoadPlanner`
    that loads non-tensor items with ``weights_only=True`` (both public extension points of
    torch.distributed.checkpoint; built on first use: importing it costs seconds)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Keeps the plain items it loads in ``items`` (by flattened key) instead of the state dict."""

        def __init__(self, directory: Path, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.directory = directory
            self.items: dict[str, Any] = {}
            self.refused: str | None = None  # DCP wraps what a planner raises: kept here too

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                self.items[fqn] = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as err:
                self.refused = refusal(self.directory, err).replace(": refused", f" (item {fqn}): refused", 1)
                raise CheckpointRefused(self.refused) from None

    return SafeFileSystemReader, SafeLoadPlanner


def _read_dcp(directory: Path, flat: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """`dcp.load` of ``flat`` (flattened keys: preallocated tensors, or None for plain items) from
    ``directory`` in this process; returns the plain items."""
    import torch.distributed.checkpoint as dcp

    reader, planner_class = _dcp_classes()
    planner = planner_class(directory, allow_partial_load=partial)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(flat, storage_reader=reader(directory), planner=planner)
    except dcp.CheckpointException as err:  # what failed on some rank, wrapped with its traceback
        if planner.refused is not None:
            raise CheckpointRefused(planner.refused) from None
        failure = next(iter(err.failures.values()), err)
        failure = getattr(failure, "exception", failure)
        why = f"{type(failure).__name__}: {failure}"
        raise ValueError(f"{directory}: unreadable sharded checkpoint ({why})") from None
    return planner.items


def load_dcp(directory: Path, keys: set[str] | None = None) -> dict[str, Any]:
    """The tensors and plain items of a torch.distributed.checkpoint directory, in the nested structure
    they were saved in (``keys``: only these top-level entries), with the public `dcp.load` API in one
    process: the target state dict is built from the metadata, full-size tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(directory)
    mappings = metadata.planner_data or {}

    def path_of(fqn: str) -> tuple:
        return tuple(mappings.get(fqn, (fqn,)))

    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if keys is None or path_of(fqn)[0] in keys:
            tensor = isinstance(md, TensorStorageMetadata)
            flat[fqn] = torch.empty(md.size, dtype=md.properties.dtype) if tensor else None
    items = _read_dcp(directory, flat)
    nested: dict[str, Any] = {}
    for fqn, value in flat.items():  # in the saved order
        _set(nested, path_of(fqn), items[fqn] if value is None else value)
    return nested


def _set(root: dict[str, Any], path: tuple, value: Any) -> None:
    """root[path[0]][path[1]]... = value, creating dicts (str keys) and lists (int keys) on the way."""
    node: Any = root
    for key, after in zip(path[:-1], path[1:], strict=True):
        empty: Any = [] if isinstance(after, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = empty
        elif key not in node:
            node[key] = empty
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def verify_for_resume(path: str | os.PathLike) -> None:
    """Before Lightning loads ``path`` (``resume=``, a rollback), refuse it unless every pickle in it
    loads with the allow-lists of this module: a file with ``weights_only=True``; a sharded directory's
    ``meta.pt`` the same way, its DCP metadata with `DCPMetadataUnpickler` and its non-tensor items with
    ``weights_only=True`` (Lightning and torch.distributed.checkpoint unpickle those two freely)."""
    p = Path(path)
    if p.is_file():
        safe_load(p)
        return
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    if not is_sharded(p):
        raise FileNotFoundError(f"{p}: neither a checkpoint file nor a sharded checkpoint directory")
    if (p / META_FILE).is_file():
        safe_load(p / META_FILE, mmap=False)
    metadata = read_dcp_metadata(p)
    items = metadata.state_dict_metadata.items()
    plain = {k: None for k, md in items if isinstance(md, BytesStorageMetadata)}
    if plain:
        _read_dcp(p, plain, partial=True)  # the plain items only: small


# -- Lightning / consolidated files ------------------------------------------------------------------------
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
            if (candidate / DCP_METADATA).is_file() or (candidate / META_FILE).is_file():
                raise ValueError(
                    f"{candidate} is a sharded (distributed) checkpoint: write one file first with "
                    f"`python -m llmforge.consolidate {candidate}` and pass that file"
                )
        raise FileNotFoundError(
            f"{path} holds no checkpoint (checkpoints/last.ckpt) nor a Hugging Face config.json"
        )
    return path


def load_lightning(file: str | Path) -> dict[str, Any]:
    """A Lightning (or consolidated) checkpoint file, loaded safely; it must hold the weights and the
    hyper-parameters."""
    ckpt = safe_load(file)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{file} lacks 'state_dict' or 'hyper_parameters': not a Lightning checkpoint")
    return ckpt


def objective_of(hparams: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> str:
    """clm, mlm or denoise, from the objective's knobs in the hyper-parameters (and the weights' names)."""
    if "noise_density" in hparams or any(k.startswith("model.encoder.") for k in state_dict):
        return "denoise"
    if "mask_prob" in hparams:
        return "mlm"
    return "clm"


def checkpoint_objective(hp: Mapping[str, Any]) -> str:
    """The objective's name as recorded in the hyper-parameters (``name``), clm when absent."""
    return str(hp.get("name") or "clm")


def model_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def load_checkpoint(path: str | Path) -> tuple[TransformerConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """An llmforge .ckpt (Lightning's, or consolidated) -> (model config, model state dict without the
    ``model.`` prefix, hyper_parameters)."""
    p = Path(path)
    if p.is_dir():
        if (p / DCP_METADATA).is_file() or (p / META_FILE).is_file():
            raise ValueError(
                f"{p} is a sharded (FSDP) checkpoint directory: consolidate it first, "
                f"python -m llmforge.consolidate {p} <out.ckpt>"
            )
        raise ValueError(
            f"{p}: neither a checkpoint file nor a Hugging Face model directory (no config.json)"
        )
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint")
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"{p}: not an llmforge checkpoint (no state_dict / hyper_parameters)")
    hp = dict(ckpt["hyper_parameters"])
    cfg = TransformerConfig(**dict(hp["model"]))
    return cfg, model_weights(ckpt["state_dict"]), hp


# -- back to a Hugging Face directory (python -m llmforge.export) ----------------------------------------
HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def data_tokenizer(hp: dict, ckpt: Path) -> Path:
    """The tokenizer the run trained on: ``tokenizer.json`` beside its data manifest (``data.path`` as the
    run got it, else the absolute path in the run dir's ``run_manifest.json``)."""
    from llmforge.data.shards import MANIFEST, TOKENIZER_FILE, sha256_file

    data_path = (hp.get("data") or {}).get("path")
    if not data_path:
        raise ValueError(f"{ckpt}: the checkpoint does not record its data path: pass --tokenizer PATH")
    data = Path(data_path)
    run_manifest = ckpt.resolve().parent.parent / "run_manifest.json"  # <run_dir>/checkpoints/x.ckpt
    if not (data / TOKENIZER_FILE).is_file() and run_manifest.is_file():  # relative to another cwd
        data = Path(json.loads(run_manifest.read_text()).get("data", {}).get("path", data_path))
    tok = data / TOKENIZER_FILE
    if not tok.is_file():
        raise FileNotFoundError(
            f"{tok}: no tokenizer (data.path of the run is {data_path}; run from the directory the run "
            "was started in, or pass --tokenizer PATH / --no-tokenizer)"
        )
    manifest = data / MANIFEST
    if manifest.is_file():
        want = json.loads(manifest.read_text()).get("tokenizer_sha256")
        if want and sha256_file(tok) != want:
            raise ValueError(f"{tok} does not match the sha256 in {manifest}: the data dir has changed")
    return tok


def export_hf(
    ckpt: str | Path, out_dir: str | Path, tokenizer: str | Path | None | bool = True, dtype: str = "float32"
) -> Path:
    """A causal LM checkpoint -> a Hugging Face Llama directory (`llmforge.hf.export_state_dict`).
    ``tokenizer``: True = the run's data tokenizer, a path, or None/False = no tokenizer files."""
    from llmforge.hf import export_state_dict

    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(HF_DTYPES)}")
    cfg, sd, hp = load_checkpoint(ckpt)
    objective = checkpoint_objective(hp)
    if objective != "clm":
        raise ValueError(
            f"{ckpt} is an objective={objective} checkpoint: only the causal LM (objective=clm) exports as "
            "LlamaForCausalLM"
        )
    tok = data_tokenizer(hp, Path(ckpt)) if tokenizer is True else (tokenizer or None)
    return export_state_dict(cfg, sd, tok, out_dir, dtype=HF_DTYPES[dtype])


# -- a model to generate with ------------------------------------------------------------------------------
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


def build_network(objective: str, cfg: TransformerConfig) -> nn.Module:
    if objective not in OBJECTIVES:
        raise ValueError(f"mode={objective!r} is not one of {', '.join(OBJECTIVES)}")
    return {"clm": Transformer, "mlm": Encoder, "denoise": EncoderDecoder}[objective](cfg)


def find_tokenizer(hparams: Mapping[str, Any], ckpt: Path, override: str | Path | None) -> Any:
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
        ckpt = load_lightning(file)
        hparams = dict(ckpt["hyper_parameters"])
        objective = objective_of(hparams, ckpt["state_dict"])
        model = build_network(objective, TransformerConfig(**hparams["model"]))
        model.load_state_dict(model_weights(ckpt["state_dict"]), strict=True)
        tok = find_tokenizer(hparams, file, tokenizer)
        loaded = LoadedModel(model, objective, dict(hparams["special_tokens"]), tok, hparams)
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


# -- the objective module (evaluation) --------------------------------------------------------------------
def objective_class(objective: str) -> type:
    from llmforge.objectives.clm import CausalLM
    from llmforge.objectives.denoise import Denoise
    from llmforge.objectives.mlm import MaskedLM

    return {"clm": CausalLM, "mlm": MaskedLM, "denoise": Denoise}[objective]


def load_module(ckpt_path: str | Path, data_path: str | Path | None = None, seq_len: int | None = None):
    """The checkpoint's objective module (eval mode) with its weights; ``data_path``/``seq_len`` replace
    the recorded ``data.path``/``data.seq_len`` (the masking seed stays the run's ``data.seed``)."""
    from llmforge.data.shards import read_manifest

    file = checkpoint_file(ckpt_path)
    ckpt = load_lightning(file)
    hparams = dict(ckpt["hyper_parameters"])
    hparams["data"] = dict(hparams.get("data") or {})
    if data_path is not None:
        hparams["data"]["path"] = str(data_path)
        hparams["data"]["vocab_size"] = read_manifest(data_path)["vocab_size"]
    if seq_len is not None:
        hparams["data"]["seq_len"] = int(seq_len)
    module = objective_class(objective_of(hparams, ckpt["state_dict"]))(**hparams)
    module.model.load_state_dict(model_weights(ckpt["state_dict"]), strict=True)
    return module.eval()


# -- continued pre-training (init_from=) ------------------------------------------------------------------
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "hidden", "tie_embeddings")
SEMANTIC_KEYS = ("rope_theta", "norm_eps", "width_mult")  # width_mult: µP's scales (1 without µP)


def init_from(module: nn.Module, source: str | Path) -> str:
    """Load weights into ``module.model`` (a freshly built objective module) from a Hugging Face Llama
    directory or an llmforge checkpoint; a shape mismatch raises ValueError naming both shapes.
    Returns a one-line description of what was loaded."""
    from llmforge.hf import from_hf

    net = module.model
    src = Path(source)
    keys = SHAPE_KEYS
    if src.is_dir() and (src / "config.json").is_file():
        if isinstance(net, EncoderDecoder):
            raise ValueError(
                f"init_from={source}: a Llama checkpoint has no encoder-decoder (objective=denoise)"
            )
        cfg, sd = from_hf(src)
        kind = "Hugging Face Llama"
    else:
        cfg, sd, hp = load_checkpoint(src)
        kind = f"llmforge checkpoint (objective={checkpoint_objective(hp)})"
        if isinstance(net, EncoderDecoder):
            keys = (*SHAPE_KEYS, "decoder_layers")
    _check_shapes(net.cfg, cfg, source, keys)
    ours = net.state_dict()
    extra = sorted(set(sd) - set(ours))
    lacking = sorted(set(ours) - set(sd))
    if extra or lacking:
        raise ValueError(
            f"init_from={source} ({kind}) does not fit this run's {type(net).__name__}: "
            f"missing {lacking[:4]}, unexpected {extra[:4]}"
        )
    for key, value in sd.items():
        if ours[key].shape != value.shape:
            raise ValueError(
                f"init_from={source}: {key} has shape {tuple(value.shape)} there, "
                f"{tuple(ours[key].shape)} here"
            )
    net.load_state_dict({k: v.to(ours[k].dtype) for k, v in sd.items()})
    return f"{kind} {source}"


def _check_shapes(
    ours: TransformerConfig, theirs: TransformerConfig, source: Any, keys: tuple[str, ...]
) -> None:
    diff = [k for k in (*keys, *SEMANTIC_KEYS) if getattr(ours, k) != getattr(theirs, k)]
    if diff:
        here = ", ".join(f"{k}={getattr(ours, k)}" for k in diff)
        there = ", ".join(f"{k}={getattr(theirs, k)}" for k in diff)
        fix = " ".join(f"model.{_override_key(k)}={_override_value(theirs, k)}" for k in diff)
        raise ValueError(
            f"init_from={source}: the model differs: this run has {here}; the source has {there} "
            f"(to match it: {fix})"
        )


def _override_key(key: str) -> str:
    return {"kv_heads": "n_kv_heads", "hidden": "ffn_hidden", "width_mult": "mup"}.get(key, key)


def _override_value(cfg: TransformerConfig, key: str) -> Any:
    if key == "width_mult":  # µP on or off, and its base width
        return f"true model.mup_base_width={cfg.mup_base_width}" if cfg.mup else "false"
    value = getattr(cfg, key)
    return str(value).lower() if isinstance(value, bool) else value


# -- sharded (strategy=fsdp) directories -> one file -------------------------------------------------------
def is_sharded(path: Path) -> bool:
    return path.is_dir() and (path / DCP_METADATA).is_file()


def default_output(ckpt_dir: Path) -> Path:
    """``checkpoints/last.ckpt/`` -> ``checkpoints/last.consolidated.ckpt``."""
    stem = ckpt_dir.name.removesuffix(".ckpt")
    return ckpt_dir.with_name(f"{stem}.consolidated.ckpt")


def index_optimizer_state(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint's form) -> the form of
    ``optimizer.state_dict()``, with integer ids.

    A parameter's id is its position in the model (``names``: the model's state-dict keys, in order;
    those the optimizer does not hold are skipped), and each param group lists its parameters' ids in the
    group's own order. `torch.optim.Optimizer.load_state_dict` matches parameters by their place in the
    groups, so it loads this; Lightning's FSDP loader (``strategy=fsdp`` resuming from a single file)
    maps id i to the i-th parameter of the model, so it loads this too.
    """
    held = {name for group in state["param_groups"] for name in group["params"]}
    missing = held - set(names)
    if missing:
        raise ValueError(f"optimizer holds parameters the model state lacks: {sorted(missing)[:3]}")
    ids = {name: i for i, name in enumerate(n for n in names if n in held)}
    unknown = set(state["state"]) - held
    if unknown:
        raise ValueError(f"optimizer state for parameters in no param group: {sorted(unknown)[:3]}")
    groups = [{**group, "params": [ids[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {ids[name]: s for name, s in state["state"].items()}, "param_groups": groups}


def load_sharded(ckpt_dir: str | os.PathLike, weights_only: bool = False) -> dict[str, Any]:
    """The whole checkpoint of a sharded directory as one dict of full tensors, as a run without
    sharding saves it: ``state_dict`` keyed like a non-sharded checkpoint, ``optimizer_states``
    (``[optimizer.state_dict()]``, parameters numbered in the model's order; not with ``weights_only``),
    and everything Lightning kept beside them in ``meta.pt`` (hyper-parameters, loops, callbacks, ...)."""
    path = Path(ckpt_dir)
    if path.is_file():
        raise ValueError(f"{path} is a file: it is a single-file checkpoint already")
    if not is_sharded(path):
        raise FileNotFoundError(f"{path} is not a sharded checkpoint directory (no .metadata file in it)")
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path / META_FILE} is missing: not a checkpoint written by Lightning")
    checkpoint: dict[str, Any] = safe_load(path / META_FILE, mmap=False)
    sharded = load_dcp(path, keys={"state_dict"} if weights_only else None)
    checkpoint["state_dict"] = sharded.pop("state_dict")
    if not weights_only:
        optimizers = sorted((k for k in sharded if k.startswith("optimizer_")), key=lambda k: int(k[10:]))
        names = list(checkpoint["state_dict"])  # the model's order (torch.distributed.checkpoint keeps it)
        checkpoint["optimizer_states"] = [index_optimizer_state(sharded.pop(k), names) for k in optimizers]
    else:
        for key in ("optimizer_states", "lr_schedulers"):
            checkpoint.pop(key, None)
    return checkpoint


def consolidate(
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    weights_only: bool = False,
    status: Callable[[str], None] = lambda phase: None,
) -> Path:
    """Write ``ckpt_dir`` as one ``.ckpt`` file (atomically: a temporary file, then a rename); ``status``
    hears each phase (reading, writing) as it starts."""
    target = Path(out) if out is not None else default_output(Path(ckpt_dir))
    status(f"reading {ckpt_dir}")
    checkpoint = load_sharded(ckpt_dir, weights_only=weights_only)
    status(f"writing {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(target)
    return target


def holds_training_state(path: str | os.PathLike) -> bool:
    """Whether a checkpoint (a file or a sharded directory) holds the optimizer and LR-schedule state a
    resume needs. Lightning's ``weights_only`` saves do not: the stability guard's step-0 checkpoint (the
    initial weights) and ``consolidate --weights-only`` files."""
    p = Path(path)
    meta = safe_load(p / META_FILE, mmap=False) if p.is_dir() else safe_load(p)
    return isinstance(meta, dict) and "lr_schedulers" in meta


def load_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """The network weights of an llmforge checkpoint (a file or a sharded directory, read in this one
    process) into ``module.model`` of a freshly built objective module."""
    p = Path(path)
    checkpoint = load_sharded(p, weights_only=True) if p.is_dir() else load_lightning(p)
    module.model.load_state_dict(model_weights(checkpoint["state_dict"]))


def strategy_load(strategy: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``strategy.load_checkpoint`` (Lightning: a file, or a sharded directory under FSDP) of a checkpoint
    that `verify_for_resume` accepted, read with ``weights_only=True``."""
    verify_for_resume(path)
    return strategy.load_checkpoint(path, weights_only=True)


# -- a resumed checkpoint fits this run ---------------------------------------------------------------------
def check_resume_fits(module: nn.Module, path: str | os.PathLike) -> None:
    """Before Lightning loads ``path`` into ``module``: every tensor of the model and of the AdamW state
    has this run's shape (else one line naming the file and the tensor, not a size-mismatch dump or a
    crash at the first optimizer step). A sharded directory is checked by torch.distributed.checkpoint."""
    from llmforge.objectives.base import param_groups

    p = Path(path)
    if not p.is_file():
        return
    ckpt = safe_load(p)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{p}: not a Lightning checkpoint (no state_dict)")
    ours, theirs = module.state_dict(), ckpt["state_dict"]
    for key, tensor in ours.items():
        if key not in theirs:
            raise ValueError(f"{p}: tensor {key} of this run's model is missing from the checkpoint")
        if tuple(theirs[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{p}: tensor {key} has shape {tuple(theirs[key].shape)} there, {tuple(tensor.shape)} in "
                "this run's model (resume needs the same model settings)"
            )
    extra = sorted(set(theirs) - set(ours))
    if extra:
        raise ValueError(f"{p}: tensor {extra[0]} is not in this run's model ({len(extra)} such)")
    states = ckpt.get("optimizer_states") or []
    if not states:
        return
    names = {id(t): f"model.{n}" for n, t in module.model.named_parameters()}
    groups = param_groups(module.model, 0.0)
    params = [q for g in groups for q in g["params"]]
    saved = states[0]
    sizes = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
    if sizes and sizes != [len(g["params"]) for g in groups]:
        raise ValueError(
            f"{p}: optimizer_states has parameter groups of sizes {sizes}, this run's optimizer "
            f"{[len(g['params']) for g in groups]}"
        )
    # a saved id names the parameter at the same place of the groups (as `Optimizer.load_state_dict` reads
    # it): ids are group order in a trainer's checkpoint, model order in a consolidated one
    by_id = dict(enumerate(params))
    if sizes:
        by_id = {
            i: q
            for g, ours in zip(saved["param_groups"], groups, strict=True)
            for i, q in zip(g["params"], ours["params"], strict=True)
        }
    for index, state in (saved.get("state") or {}).items():
        if index not in by_id:
            raise ValueError(f"{p}: optimizer state for parameter {index!r}, this run has {len(params)}")
        param = by_id[index]
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(
                    f"{p}: optimizer state {name} of {names.get(id(param), index)} has shape "
                    f"{tuple(value.shape)} there, {tuple(param.shape)} in this run's model"
                )


# -- writing -----------------------------------------------------------------------------------------------
class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a quota): the previous file at that path is intact."""


TMP_MARK = ".tmp-"  # `atomic_write`'s temporary names: .<name>.tmp-<pid>


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """``write(file)`` into a temporary file next to ``path`` (same filesystem), fsync it, rename it over
    ``path`` and fsync the directory: ``path`` is the old file or the complete new one, never a truncated
    one. On any failure the temporary file is removed and `CheckpointSaveError` names ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        if not isinstance(err, OSError) and shutil.disk_usage(path.parent).free < 1 << 20:
            reason = os.strerror(errno.ENOSPC)  # torch.save's zip writer words it "unexpected pos ..."
        tmp.unlink(missing_ok=True)
        raise CheckpointSaveError(
            f"{path}: could not be saved ({reason}); the previous checkpoint there is unchanged"
        ) from None


def remove_interrupted_writes(directory: Path) -> list[Path]:
    """Temporary files of saves that a killed process left behind (`atomic_write`, `copy_checkpoint`)."""
    if not directory.is_dir():
        return []
    left = [p for p in directory.iterdir() if TMP_MARK in p.name or p.name.endswith(".ckpt.tmp")]
    for p in left:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return left


def atomic_checkpoint_io() -> Any:
    """Lightning's `TorchCheckpointIO` writing through `atomic_write` (its own writes go through a
    temporary file in ``$TMPDIR``, then a copy over the old file: a full disk truncates the checkpoint)."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if storage_options is not None:
                raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(checkpoint, f))

    return AtomicCheckpointIO()
