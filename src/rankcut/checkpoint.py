"""A checkpoint source: the model's skeleton without weights, and its weights one module at a time.

Compression reads a Hugging Face safetensors checkpoint (one file, or shards named by
``model.safetensors.index.json``) block by block. The skeleton is built with accelerate's
``init_empty_weights``: parameters on the meta device, buffers (rotary ``inv_freq``) real. A decoder
block's tensors are read from disk when its turn comes and dropped afterwards, and every file is closed
(unmapped) as soon as the tensors are read, so host memory holds one block however deep the model is.

Everything about the files is checked when the source is opened, from the safetensors headers alone
(no tensor is read): every shard the index names exists and is whole, holds the tensors the index places
in it, and every parameter the config implies is there with the shape the config implies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import CheckpointError, loading_errors
from .memory import release_freed_memory

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    shape: tuple[int, ...]


class CheckpointSource:
    """A model folder's config and the location and shape of every stored tensor."""

    def __init__(self, folder: Path, config, tensors: dict[str, StoredTensor], dtype: torch.dtype,
                 device: torch.device, trust_remote_code: bool = False) -> None:
        self.folder, self.config, self.tensors = folder, config, tensors
        self.dtype, self.device, self.trust_remote_code = dtype, device, trust_remote_code

    @classmethod
    def open(cls, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", trust_remote_code: bool = False) -> "CheckpointSource":
        """Read and check ``folder``'s config and safetensors headers; :class:`CheckpointError` names
        the file at fault."""
        from transformers import AutoConfig

        folder = Path(folder)
        with loading_errors(str(folder)):
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
            raise CheckpointError(f"{folder} holds an already quantized or compressed model (quant_method={method!r}); "
                                  "compress its dense checkpoint")
        source = cls(folder, config, _stored_tensors(folder), dtype, torch.device(device), trust_remote_code)
        with loading_errors(str(folder)):
            skeleton = source.skeleton()
        source._check_against(skeleton)
        return source

    def skeleton(self) -> nn.Module:
        """The model with every parameter on the meta device and real buffers, in eval mode."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                     trust_remote_code=self.trust_remote_code)
        model.tie_weights()  # a tied head is one parameter, stored once (under the embedding's name)
        for module in model.modules():  # the real buffers (rotary inv_freq) go where the blocks will run
            for name, buffer in module.named_buffers(recurse=False):
                setattr(module, name, buffer.to(self.device))
        return model.eval()

    def _check_against(self, model: nn.Module) -> None:
        for name, expected in stored_names(model).items():
            stored = self.tensors.get(name)
            if stored is None:
                raise CheckpointError(f"{self.folder}: the checkpoint lacks {name}, which the config's "
                                      f"{type(model).__name__} needs (a missing shard or a different architecture)")
            if stored.shape != expected:
                raise CheckpointError(f"{stored.file}: {name} has shape {list(stored.shape)}, the config implies "
                                      f"{list(expected)}")

    def load_tensors(self, model: nn.Module, names: list[str]) -> None:
        """Materialize the named tensors of ``model``; each file is opened once and closed (unmapped)
        before returning."""
        from accelerate.utils import set_module_tensor_to_device

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        for path, group in by_file.items():
            try:
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in group:
                        tensor = handle.get_tensor(name)
                        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
                        # a copy in torch's own memory: the file's mapping must not outlive this block
                        value = tensor.to(device=self.device, dtype=dtype, copy=True)
                        set_module_tensor_to_device(model, name, self.device, value=value)
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"{path}: could not read its tensors ({error})") from error

    def stream(self, model: nn.Module) -> "StreamedWeights":
        """The block-by-block loader of ``model``, a skeleton of this source."""
        return StreamedWeights(self, model)


class ResidentWeights:
    """The weights of a model already in memory: the pipeline's onload and offload do nothing."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        """Where the blocks run."""
        return next(self.model.parameters()).device

    def onload(self, prefixes: list[str]) -> None:
        """Make the parameters of the named submodules (``""``: the whole model) real."""

    def offload(self, prefixes: list[str]) -> None:
        """Let go of the parameters of the named submodules."""

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor by its full name, wherever it is now (to fingerprint the model)."""
        owner, _, attribute = name.rpartition(".")
        return getattr(self.model.get_submodule(owner), attribute).detach()


class StreamedWeights(ResidentWeights):
    """A skeleton's weights read from its checkpoint when the pipeline reaches them and dropped back to
    the meta device after (whatever the submodule holds by then: factors too)."""

    def __init__(self, source: CheckpointSource, model: nn.Module) -> None:
        super().__init__(model)
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.source.device

    def onload(self, prefixes: list[str]) -> None:
        self.source.load_tensors(self.model, [name for prefix in prefixes for name in tensor_names(self.model, prefix)])
        self.model.tie_weights()  # loading replaced the tied parameter's object

    def offload(self, prefixes: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for prefix in prefixes:
            for name, _ in list(self.model.get_submodule(prefix).named_parameters()):
                set_module_tensor_to_device(self.model, f"{prefix}.{name}" if prefix else name, "meta")
        self.model.tie_weights()
        release_freed_memory()

    def tensor(self, name: str) -> torch.Tensor:
        stored = self.source.tensors[name]
        with safe_open(stored.file, framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).to(self.source.dtype)


def tensor_names(model: nn.Module, prefix: str) -> list[str]:
    """Full names of the tensors a checkpoint of ``model`` holds for its submodule ``prefix`` (``""``: all);
    a tied parameter only under its first name (a tied head: none)."""
    return [name for name in stored_names(model) if not prefix or name == prefix or name.startswith(f"{prefix}.")]


def outer_modules(model: nn.Module, blocks_prefix: str) -> list[str]:
    """The submodules that hold parameters outside the decoder blocks (embeddings, final norm, head)."""
    return [name for name, module in model.named_modules()
            if any(True for _ in module.parameters(recurse=False))
            and not (name == blocks_prefix or name.startswith(blocks_prefix + "."))]


def stored_names(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """What a checkpoint of ``module`` holds: parameters and persistent buffers, a tied parameter once."""
    seen: set[int] = set()
    names = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) not in seen:
            seen.add(id(parameter))
            names[name] = tuple(parameter.shape)
    for name, buffer in module.state_dict(keep_vars=True).items():
        if name not in names and not isinstance(buffer, nn.Parameter):
            names[name] = tuple(buffer.shape)
    return names


def _stored_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor's file and shape, from the index and the shards' headers."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            placed = {str(name): folder / str(file) for name, file in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from error
    elif (folder / SINGLE).is_file():
        placed = None
    else:
        raise CheckpointError(f"{folder}: no {SINGLE} or {INDEX} (rankcut reads safetensors checkpoints only; "
                              "pickled .bin weights are never loaded)")
    files = sorted(set(placed.values())) if placed is not None else [folder / SINGLE]
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard (named by {index})")
        try:
            with safe_open(path, framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    if placed is None or placed.get(name) == path:
                        tensors[name] = StoredTensor(path, tuple(handle.get_slice(name).get_shape()))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: not a whole safetensors file, truncated or damaged ({error})") from error
    if placed is not None:
        for name, path in placed.items():
            if name not in tensors:
                raise CheckpointError(f"{path}: does not hold {name}, which {index.name} places there")
    return tensors
