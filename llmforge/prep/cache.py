"""A per-user cache for small facts derived from the installed software (never from data): what is in it
depends only on package or Unicode versions, which are part of every key, so an entry is never stale."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMFORGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/llmforge``, else ``~/.cache/llmforge``."""
    env = os.environ.get("LLMFORGE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmforge"


def store(name: str, data: bytes) -> None:
    """Write a cache entry atomically; a read-only or missing home only means recomputing next time."""
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass


def load(name: str) -> bytes | None:
    try:
        return (cache_dir() / name).read_bytes()
    except OSError:
        return None
