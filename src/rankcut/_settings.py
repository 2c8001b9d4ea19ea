"""Where rankcut keeps its cache and finds local data; overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cache_dir() -> Path:
    """``RANKCUT_CACHE``, else ``$XDG_CACHE_HOME/rankcut``, else ``~/.cache/rankcut``."""
    if env := os.environ.get("RANKCUT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "rankcut"


def data_dirs(explicit: str | os.PathLike | None = None) -> list[Path]:
    """Local data folders to search, in order: the argument, then ``RANKCUT_DATA``."""
    found = [Path(p).expanduser() for p in (explicit, os.environ.get("RANKCUT_DATA")) if p]
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    try:
        return names[str(dtype).lower()]
    except KeyError:
        from .errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}") from None
