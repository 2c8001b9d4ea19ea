"""Compressed-model artifacts: a Hugging Face folder that loads again, with no pickle and no remote code.

``OUT/config.json`` is the base config plus ``quantization_config`` with ``quant_method: "rankcut"``:
the format version, every factorized module's layer type and rank, the rank plan, the settings and the
diagnostics. Importing rankcut registers that method with transformers, so both ``rankcut.load(OUT)``
and ``AutoModelForCausalLM.from_pretrained(OUT)`` rebuild the factorized skeleton before loading
``model.safetensors``. ``OUT/rankcut_manifest.json`` holds file hashes that ``rankcut.load`` verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._settings import resolve_device, resolve_dtype
from .checkpoint import stored_names, tensor_names
from .errors import ArtifactError
from .layers import LAYER_CLASSES, build_layer, describe_layer
from .targets import find_decoder_blocks, set_submodule
from .workdir import is_disk_full

# 1: plain factors only; 2: adds PivGa layers ("type": "pivga" with a "variant"). Older versions load.
FORMAT_VERSION = 2
METHOD = "rankcut"
MANIFEST = "rankcut_manifest.json"


def _newer_format(version: Any) -> ArtifactError:
    return ArtifactError(f"artifact format version {version!r} is newer than this rankcut supports "
                         f"({FORMAT_VERSION}); upgrade rankcut (pip install -U rankcut)")


@register_quantization_config(METHOD)
class RankcutConfig(QuantizationConfigMixin):
    """The ``rankcut`` section of an artifact's config.json."""

    def __init__(self, format_version: int = FORMAT_VERSION, modules: dict[str, dict] | None = None,
                 plan: dict | None = None, settings: dict | None = None, diagnostics: dict | None = None,
                 measured: dict | None = None, **kwargs: Any) -> None:
        self.quant_method = METHOD
        self.format_version = format_version
        self.modules = modules or {}
        self.plan = plan or {}
        self.settings = settings or {}
        self.diagnostics = diagnostics or {}
        self.measured = measured or {}
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.format_version, int) or self.format_version > FORMAT_VERSION:
            raise _newer_format(self.format_version)
        for key in ("modules", "plan", "settings", "diagnostics", "measured"):
            if not isinstance(getattr(self, key), dict):
                raise ArtifactError(f"artifact config: {key!r} must be a JSON object, got {getattr(self, key)!r}")
        for name, description in self.modules.items():
            rank = description.get("rank") if isinstance(description, dict) else None
            if not (isinstance(name, str) and name and isinstance(description, dict)
                    and description.get("type") in LAYER_CLASSES
                    and isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
                raise ArtifactError(f"artifact config: invalid layer description for {name!r}: {description!r} "
                                    f"(expected a type in {sorted(LAYER_CLASSES)} and an integer rank >= 1)")


def factorize_skeleton(model: nn.Module, modules: dict[str, dict]) -> None:
    """Replace the named ``nn.Linear`` modules by empty factorized layers of the described ranks."""
    for name, description in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"artifact names module {name!r}, which the base architecture does not have") from None
        if type(linear) is not nn.Linear:
            raise ArtifactError(f"artifact factorizes {name!r}, which is a {type(linear).__name__}, not nn.Linear")
        if description["rank"] > min(linear.in_features, linear.out_features):
            raise ArtifactError(f"artifact rank {description['rank']} for {name!r} exceeds its shape")
        try:
            layer = build_layer(description, linear.in_features, linear.out_features, linear.bias is not None,
                                dtype=linear.weight.dtype, device=linear.weight.device)
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"artifact layer description for {name!r} is invalid: {error}") from error
        set_submodule(model, name, layer)


@register_quantizer(METHOD)
class RankcutQuantizer(HfQuantizer):
    """Lets ``from_pretrained`` build the factorized skeleton before the weights are loaded."""

    requires_calibration = True  # only pre-compressed checkpoints can be loaded

    def _process_model_before_weight_loading(self, model, **kwargs):
        factorize_skeleton(model, self.quantization_config.modules)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Refuse factors the checkpoint lacks: transformers would leave them uninitialized (garbage) with
        only a warning. Checked for local folders, from the safetensors headers (no weights are read)."""
        folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        stored = stored_weight_names(folder) if folder.is_dir() else None
        if stored is None:
            return model
        factor_names = {f"{name}.{parameter}" for name in self.quantization_config.modules
                        for parameter in model.get_submodule(name).state_dict()}
        missing = sorted(factor_names - stored)
        if missing:
            raise ArtifactError(f"the weights in {folder} lack {len(missing)} factor tensor(s) its config describes "
                                f"(e.g. {', '.join(missing[:3])}): the artifact is incomplete or was edited; "
                                f"rankcut.load({str(folder)!r}) verifies it file by file")
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def stored_weight_names(folder: Path) -> set[str] | None:
    """Tensor names in a folder's safetensors checkpoint (single file or sharded), or None if it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    with safe_open(single, framework="pt") as handle:
        return set(handle.keys())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "files": files}, indent=2))


def verify_artifact(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file against the manifest; raise :class:`ArtifactError` on any difference."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not a rankcut artifact (no {MANIFEST}); was the save interrupted?")
    try:
        manifest = json.loads(manifest_path.read_text())
        version, files = manifest["format_version"], manifest["files"]
        entries = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # ValueError: bad JSON or UTF-8
        raise ArtifactError(f"{manifest_path} is unreadable ({error!r})") from error
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _newer_format(version)  # a newer manifest may not even list files the way this one does
    for name, (size, sha256) in entries.items():
        path = folder / name
        if Path(name).name != name:
            raise ArtifactError(f"{manifest_path} names a file outside the artifact: {name!r}")
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {folder}")
        if path.stat().st_size != size or _sha256(path) != sha256:
            raise ArtifactError(f"artifact file {name} in {folder} was truncated or altered (hash mismatch)")
    return manifest


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, that exists without ``overwrite``, or that is a folder other
    than an artifact or empty (``--overwrite`` replaces an artifact, never an arbitrary folder)."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} is a file; --out must be a folder path")
    if not out.exists():
        return
    if not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} is a folder that is not a rankcut artifact; --overwrite replaces only "
                            "artifacts: choose another --out")


class ArtifactWriter:
    """Writes an artifact one group of modules at a time, so a compressed model never has to be whole
    in memory: each decoder block becomes one safetensors shard as soon as it is factorized, the modules
    outside the blocks (embeddings, final norm, head) the last one, and :meth:`finish` adds the index,
    config, tokenizer, reports and manifest in a staging folder beside ``out`` and moves it into place.
    Used as a context manager: on any failure the staging folder is removed and ``out`` is untouched."""

    def __init__(self, out: str | os.PathLike, shards: int, *, overwrite: bool = False) -> None:
        self.out, self.shards = Path(out), shards
        check_output_folder(self.out, overwrite)
        self.staging: Path | None = None
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.modules: dict[str, dict] = {}  # factorized layer descriptions, for the config
        self.written = 0

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def write(self, model: nn.Module, names: list[str]) -> None:
        """Write the named tensors of ``model`` (parameters and persistent buffers) as the next shard,
        with the layer description of every factorized module among them."""
        assert self.staging is not None, "use ArtifactWriter as a context manager"
        self.written += 1
        shard = f"model-{self.written:05d}-of-{self.shards:05d}.safetensors"
        tensors = {}
        for name in names:
            owner, _, attribute = name.rpartition(".")
            module = model.get_submodule(owner)
            tensors[name] = getattr(module, attribute).detach().contiguous()
            if (description := describe_layer(module)) is not None:
                self.modules[owner] = description
        self._guarded(lambda: save_file(tensors, self.staging / shard, metadata={"format": "pt"}))
        self.weight_map.update(dict.fromkeys(tensors, shard))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, model: nn.Module, tokenizer, *, plan: dict, settings: dict, diagnostics: dict, measured: dict,
               extra_files: dict[str, str]) -> Path:
        """Index, ``model``'s config (with the rankcut section, as ``save_pretrained`` writes it) and
        generation config, tokenizer, ``extra_files`` (name -> text) and the manifest; then move the
        folder to ``out``."""
        assert self.staging is not None and self.written == self.shards, "every shard must be written first"
        staging = self.staging
        config = RankcutConfig(FORMAT_VERSION, self.modules, plan, settings, diagnostics, measured)
        model_config = model.config
        previous = getattr(model_config, "quantization_config", None)

        def write_files() -> None:
            (staging / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}, indent=2))
            model_config.quantization_config = config
            model_config.dtype = str(model.dtype).removeprefix("torch.")
            model_config.architectures = [type(model).__name__]
            model_config.save_pretrained(staging)
            if model.can_generate():
                model.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, text in extra_files.items():
                (staging / name).write_text(text)
            _write_manifest(staging)

        try:
            self._guarded(write_files)
        finally:
            if previous is None:
                model_config.__dict__.pop("quantization_config", None)
            else:
                model_config.quantization_config = previous
        _move_into_place(staging, self.out)
        self.staging = None
        return self.out

    def _guarded(self, write) -> None:
        try:
            write()
        except (OSError, SafetensorError) as error:
            hint = "the disk is full: free some space or choose another --out" if is_disk_full(error) else "check --out"
            raise ArtifactError(f"could not write the artifact ({error}); {hint}. Nothing was written to {self.out}"
                                ) from error


def save_artifact(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, plan: dict, settings: dict,
                  diagnostics: dict, measured: dict, extra_files: dict[str, str], overwrite: bool = False) -> Path:
    """Write a model held in memory as an artifact, block by block like the streamed path."""
    groups = shard_groups(model)
    with ArtifactWriter(out_dir, len(groups), overwrite=overwrite) as writer:
        for names in groups:
            writer.write(model, names)
        return writer.finish(model, tokenizer, plan=plan, settings=settings, diagnostics=diagnostics,
                             measured=measured, extra_files=extra_files)


def shard_groups(model: nn.Module) -> list[list[str]]:
    """The tensor names of each shard, as they stand now: one group per decoder block, then the rest
    (a tied parameter once)."""
    prefix, blocks = find_decoder_blocks(model, with_linears=False)
    groups = [tensor_names(model, f"{prefix}.{index}") for index in range(len(blocks))]
    inside = {n for group in groups for n in group}
    return [*groups, [n for n in stored_names(model) if n not in inside]]


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an artifact it replaces is moved aside first and deleted
    only afterwards, so at every moment ``out`` is either the old artifact or the new one (or absent)."""
    if not out.exists():
        staging.replace(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.replace(old / out.name)
    staging.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def load(path: str | os.PathLike, *, dtype: str | torch.dtype | None = "float32",
         device: str | torch.device | None = "auto", verify: bool = True):
    """Load ``(model, tokenizer)`` from a rankcut artifact, verifying its manifest first.

    The tokenizer is None when the artifact was saved without one.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder} is not a model folder (no config.json)")
    if verify:
        verify_artifact(folder)
    try:
        quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ArtifactError(f"{folder / 'config.json'} is not a valid JSON object ({error})") from error
    if not isinstance(quantization, dict) or quantization.get("quant_method") != METHOD:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise ArtifactError(f"{folder} is not a rankcut artifact (quant_method={method!r})")
    RankcutConfig(**{k: v for k, v in quantization.items() if k != "quant_method"})  # validates before any load
    # Safetensors only (no pickle), no code from the folder. Every weight must come from the file: any
    # missing, unexpected or mismatched key is refused below (mismatches are reported, not raised, so
    # that the message is ours).
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=resolve_dtype(dtype), use_safetensors=True, trust_remote_code=False,
            output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, SafetensorError) as error:  # e.g. weights only as pickle (.bin), which is never read
        raise ArtifactError(f"could not load the weights of {folder} ({error.__class__.__name__}: {error})") from error
    problems = {key: sorted(info.get(key) or [])[:5] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ArtifactError(f"the weights in {folder} do not match the factorized architecture its config "
                            f"describes ({', '.join(f'{k}: {v}' for k, v in problems.items() if v)})")
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False) if has_tokenizer else None
    return model.to(resolve_device(device)).eval(), tokenizer
