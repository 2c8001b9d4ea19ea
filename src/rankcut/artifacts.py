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
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._settings import resolve_device, resolve_dtype
from .errors import ArtifactError
from .layers import build_layer, describe_layer
from .targets import set_submodule

# 1: plain factors only; 2: adds PivGa layers ("type": "pivga" with a "variant"). Older versions load.
FORMAT_VERSION = 2
METHOD = "rankcut"
MANIFEST = "rankcut_manifest.json"


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
            raise ArtifactError(
                f"artifact format version {self.format_version!r} is newer than this rankcut supports "
                f"({FORMAT_VERSION}); upgrade rankcut (pip install -U rankcut)"
            )
        if not isinstance(self.modules, dict):
            raise ArtifactError("artifact config: 'modules' must map module names to layer descriptions")
        for name, description in self.modules.items():
            if not (isinstance(description, dict) and isinstance(description.get("type"), str)
                    and isinstance(description.get("rank"), int) and description["rank"] >= 1):
                raise ArtifactError(f"artifact config: invalid layer description for {name!r}: {description!r}")


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

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


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
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ArtifactError(f"{manifest_path} is unreadable ({error})") from error
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {folder}")
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"artifact file {name} in {folder} was truncated or altered (hash mismatch)")
    return manifest


def save_artifact(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, plan: dict, settings: dict,
                  diagnostics: dict, measured: dict, extra_files: dict[str, str], overwrite: bool = False) -> Path:
    """Write the artifact to a temporary folder beside ``out_dir`` and move it into place when complete.

    ``extra_files`` (name -> text: model card, reports) are written beside the weights and hashed too.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    modules = {name: description for name, module in model.named_modules()
               if (description := describe_layer(module)) is not None}
    config = RankcutConfig(FORMAT_VERSION, modules, plan, settings, diagnostics, measured)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    previous = getattr(model.config, "quantization_config", None)
    try:
        model.config.quantization_config = config
        try:
            model.save_pretrained(staging, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            for name, text in extra_files.items():
                (staging / name).write_text(text)
            _write_manifest(staging)
        except OSError as error:
            raise ArtifactError(f"could not write the artifact ({error}); nothing was written to {out}") from error
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    finally:
        if previous is None:
            model.config.__dict__.pop("quantization_config", None)
        else:
            model.config.quantization_config = previous
        shutil.rmtree(staging, ignore_errors=True)
    return out


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
        quantization = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    except json.JSONDecodeError as error:
        raise ArtifactError(f"{folder / 'config.json'} is not valid JSON ({error})") from error
    if quantization.get("quant_method") != METHOD:
        raise ArtifactError(f"{folder} is not a rankcut artifact (quant_method={quantization.get('quant_method')!r})")
    RankcutConfig(**{k: v for k, v in quantization.items() if k != "quant_method"})  # validates before any load
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(dtype))
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    return model.to(resolve_device(device)).eval(), tokenizer
