"""The dense model run block by block for the allocators, with one decoder block resident at a time:
gradients of the calibration loss (zerosum), and the loss of many one-block changes in one pass (strs).

A forward pass runs the blocks in order on the calibration windows and saves each block's input to a
file (:class:`ActivationStore`). The loss is taken through the model's own final norm
and head in chunks of tokens, so only one chunk's vocabulary-wide logits exist at a time (a 262k-word
head makes them the largest tensor of the run). Then a reverse sweep brings each block back, from the
last to the first, recomputes it from its saved input, and backpropagates the gradient arriving from
above: the targets' weight gradients go to a callback, the input's gradient moves on to the block below.

Peak memory: one block's weights and weight gradients, the saved inputs of one block with the
gradients entering and leaving it (``3 x windows x seqlen x hidden``), one batch's autograd tensors
inside the block, and one chunk of logits. Every other block's input waits in the store.

:func:`probe_losses` measures the loss of the model with one block changed (one module truncated), for
many such probes at once: every block is loaded once, and runs the dense activations and those of every
probe started below it, which wait in the store between blocks.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Iterator, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .calibration import BlockStream, block_output
from .checkpoint import ResidentWeights, outer_modules, tensor_names
from .decomposition import Spectrum
from .distributed import Ranks
from .targets import TargetModule, find_decoder_blocks

LOGITS_BYTES = 256 * 2**20  # float32 logits of one chunk of tokens; the chunk's length follows from the vocabulary

BlockGradients = Callable[[int, dict[str, torch.Tensor]], None]
"""``on_block(index, {name: dL/dX})``: called once per block, from the last block to the first, with the
gradients of the block's target weights (by target name) and of the tensors its change yielded (by key)."""

BlockChange = Callable[[int, nn.Module], contextlib.AbstractContextManager[dict[str, torch.Tensor] | None]]
"""``change(index, block)``: a context within which block ``index`` (resident) runs changed, for
example with truncated weights or gated factors; the sweep enters it around every run of the block. It
may yield ``{key: tensor}``: leaves the changed block computes with (a gate, say) whose gradients are
wanted; they need ``requires_grad``."""

Probes = Callable[[int, nn.Module], Iterator[Hashable]]
"""``probes(index, block)``: for each probe that starts at block ``index``, change the block (truncate
one of its modules), yield the probe's key, and undo the change when resumed; the block runs on the
dense model's inputs while the generator waits."""


class ActivationStore:
    """Named tensors under integer keys, written one safetensors file per key under ``folder`` (no
    pickle) and read back once: what waits on disk while another block is resident."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def put(self, key: int, tensors: dict[str, torch.Tensor]) -> None:
        save_file({name: t.contiguous() for name, t in tensors.items()}, self._file(key))

    def take(self, key: int, device: torch.device) -> dict[str, torch.Tensor]:
        path = self._file(key)
        loaded = load_file(path)
        path.unlink()
        return {name: t.to(device) for name, t in loaded.items()}

    def put_batches(self, key: int, tensors: list[torch.Tensor]) -> None:
        self.put(key, {str(i): t for i, t in enumerate(tensors)})

    def take_batches(self, key: int, device: torch.device) -> list[torch.Tensor]:
        loaded = self.take(key, device)
        return [loaded[str(i)] for i in range(len(loaded))]

    def _file(self, key: int) -> Path:
        return self.folder / f"{key:04d}.safetensors"


class _Bypass(nn.Module):
    """Stands in for a decoder block: hands its hidden states on unchanged (the head alone runs)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _blocks_bypassed(model: nn.Module) -> Iterator[None]:
    _, blocks = find_decoder_blocks(model, with_linears=False)
    originals = list(blocks)
    for index in range(len(blocks)):
        blocks[index] = _Bypass()
    try:
        yield
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No parameter asks for a gradient unless the sweep says so; the flags come back afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags.get(name, True))


def head_loss(model: nn.Module, final_hidden: list[torch.Tensor], batches: list[torch.Tensor], chunk_tokens: int,
              *, with_gradients: bool = False,
              reference: list[torch.Tensor] | None = None) -> tuple[float, list[torch.Tensor]]:
    """The mean next-token cross-entropy over every window of ``batches`` given the last block's
    outputs and, ``with_gradients``, its gradient with respect to them (else an empty list). The model's
    own forward computes the logits (its norm, head and any logit soft-capping) on ``inputs_embeds``
    with every block bypassed, one chunk of predicted positions at a time. With ``reference`` (another
    model's last block outputs, say the dense model's) the loss is the mean ``KL(p_reference ‖ p)`` over
    the same positions instead."""
    device = final_hidden[0].device
    total = sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)
    loss, gradients = 0.0, []
    with _blocks_bypassed(model), torch.set_grad_enabled(with_gradients):
        for batch, (hidden, ids) in enumerate(zip(final_hidden, batches)):
            width = hidden.shape[-1]
            flat = hidden[:, :-1].reshape(-1, width)
            labels = ids[:, 1:].reshape(-1).to(device)
            flat_gradient = torch.empty_like(flat) if with_gradients else None
            for start in range(0, flat.shape[0], chunk_tokens):
                piece = flat[start:start + chunk_tokens].detach().requires_grad_(with_gradients)
                logits = _logits(model, piece)
                if reference is None:
                    chunk_loss = F.cross_entropy(logits, labels[start:start + chunk_tokens], reduction="sum") / total
                else:
                    with torch.no_grad():
                        target = _logits(model, reference[batch][:, :-1].reshape(-1, width)[start:start + chunk_tokens])
                    chunk_loss = F.kl_div(logits.log_softmax(-1), target.log_softmax(-1), log_target=True,
                                          reduction="sum") / total
                if with_gradients:
                    (flat_gradient[start:start + chunk_tokens],) = torch.autograd.grad(chunk_loss, piece)
                loss += float(chunk_loss.detach())
            if with_gradients:
                gradient = torch.zeros_like(hidden)
                gradient[:, :-1] = flat_gradient.view(hidden.shape[0], hidden.shape[1] - 1, width)
                gradients.append(gradient)
    return loss, gradients


def _logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's logits (at least float32) for a flat ``tokens x hidden`` chunk of last-block outputs."""
    logits = model(inputs_embeds=hidden.unsqueeze(0), use_cache=False).logits[0]
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _resident_blocks(model: nn.Module, weights: ResidentWeights) -> Iterator[tuple[int, nn.Module]]:
    """Each decoder block in order, its weights onloaded while the caller works on it, offloaded after."""
    prefix, blocks = find_decoder_blocks(model, with_linears=False)
    for index, block in enumerate(blocks):
        weights.onload([f"{prefix}.{index}"])
        try:
            yield index, block
        finally:
            weights.offload([f"{prefix}.{index}"])


def _chunk_tokens(model: nn.Module) -> int:
    return max(1, LOGITS_BYTES // (4 * model.get_output_embeddings().out_features))


def weight_gradients(model: nn.Module, weights: ResidentWeights, targets: list[TargetModule], windows: torch.Tensor,
                     batch_size: int, on_block: BlockGradients, *, store_dir: Path | None = None,
                     change: BlockChange | None = None, progress: Callable[..., None] | None = None,
                     reference: list[torch.Tensor] | None = None) -> float:
    """Backpropagate the mean next-token loss over ``windows`` (token ids, ``n x seqlen``) through the
    model one block at a time (module docstring) and hand each block's gradients to ``on_block``: of
    the weights of ``targets``, and of the leaves ``change`` yields. Gradients are summed over batches
    in at least float32. ``store_dir``: a folder for the saved block inputs (None: a temporary folder).
    ``change`` runs each block changed (the gradients are then those of the changed model).
    ``reference``: last-block outputs per batch (:func:`final_hidden`) to take the KL divergence to
    instead of the cross-entropy (:func:`head_loss`). Returns the loss."""
    change = change or (lambda _index, _block: contextlib.nullcontext())
    stream = BlockStream(model, [], windows, batch_size, weights=weights)
    prefix, blocks = find_decoder_blocks(model, with_linears=False)
    with contextlib.ExitStack() as stack, _frozen(model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if store_dir is None:
            store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rankcut-sweep-")))
        store = ActivationStore(store_dir)
        hidden, block_kwargs = stream.capture()
        for index, block in _resident_blocks(model, weights):
            store.put_batches(index, hidden)
            with change(index, block):
                hidden = stream.forward_block(block, hidden, block_kwargs[index])
            if progress is not None:
                progress(1)
        hidden = [h.clone() for h in hidden]  # out of inference mode, into autograd
        head = outer_modules(model, prefix)  # the norm and head; the embeddings too, which a tied head shares
        weights.onload(head)
        try:
            for parameter in model.parameters():
                parameter.requires_grad_(False)
            loss, upstream = head_loss(model, hidden, stream.batches, _chunk_tokens(model), with_gradients=True,
                                       reference=reference)
        finally:
            weights.offload(head)
        del hidden
        by_block: dict[int, list[TargetModule]] = {}
        for target in targets:
            by_block.setdefault(target.block, []).append(target)
        for index in reversed(range(len(blocks))):
            upstream = _backward_block(model, weights, f"{prefix}.{index}", blocks[index], store.take_batches(index, stream.device),
                                       block_kwargs[index], upstream, by_block.get(index, []), index > 0, on_block, index,
                                       change)
            if progress is not None:
                progress(1)
    return loss


def final_hidden(model: nn.Module, weights: ResidentWeights, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The last block's outputs on ``windows``, one tensor per batch, one block resident at a time: what
    :func:`head_loss` takes as a ``reference``."""
    stream = BlockStream(model, [], windows, batch_size, weights=weights)
    hidden, block_kwargs = stream.capture()
    for index, block in _resident_blocks(model, weights):
        hidden = stream.forward_block(block, hidden, block_kwargs[index])
    return [h.clone() for h in hidden]


def probe_losses(model: nn.Module, weights: ResidentWeights, windows: torch.Tensor, batch_size: int,
                 probes: Probes, *, store_dir: Path | None = None,
                 progress: Callable[..., None] | None = None) -> tuple[float, dict[Hashable, float]]:
    """The mean next-token loss over ``windows`` of the dense model and of every probe (see
    :data:`Probes`), in one pass over the blocks (module docstring). A probe's blocks below its own
    give the dense outputs exactly, so they are not run again. ``progress`` advances once per block
    and once for the head."""
    stream = BlockStream(model, [], windows, batch_size, weights=weights)
    prefix, blocks = find_decoder_blocks(model, with_linears=False)
    started: dict[int, list[Hashable]] = {}  # block -> keys of the probes that started there
    with contextlib.ExitStack() as stack:
        if store_dir is None:
            store_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rankcut-probes-")))
        store = ActivationStore(store_dir)
        dense, block_kwargs = stream.capture()
        batches = range(len(dense))
        for index, block in _resident_blocks(model, weights):
            kwargs = block_kwargs[index]
            for origin, keys in started.items():
                states = store.take(origin, stream.device)
                store.put(origin, {f"{p}.{b}": out for p in range(len(keys)) for b, out in enumerate(
                    stream.forward_block(block, [states[f"{p}.{b}"] for b in batches], kwargs))})
            here: dict[str, torch.Tensor] = {}
            for position, key in enumerate(probes(index, block)):
                outputs = stream.forward_block(block, dense, kwargs)
                here.update({f"{position}.{b}": out for b, out in enumerate(outputs)})
                started.setdefault(index, []).append(key)
            if here:
                store.put(index, here)
            dense = stream.forward_block(block, dense, kwargs)
            if progress is not None:
                progress(1)
        head = outer_modules(model, prefix)
        weights.onload(head)
        try:
            chunk = _chunk_tokens(model)
            dense_loss, _ = head_loss(model, dense, stream.batches, chunk)
            losses = {}
            for origin, keys in started.items():
                states = store.take(origin, stream.device)
                for position, key in enumerate(keys):
                    losses[key], _ = head_loss(model, [states[f"{position}.{b}"] for b in batches], stream.batches, chunk)
        finally:
            weights.offload(head)
        if progress is not None:
            progress(1)
    return dense_loss, losses


def _backward_block(model: nn.Module, weights: ResidentWeights, name: str, block: nn.Module,
                    inputs: list[torch.Tensor], kwargs: list[dict], upstream: list[torch.Tensor],
                    targets: list[TargetModule], input_gradient: bool, on_block: BlockGradients,
                    index: int, change: BlockChange) -> list[torch.Tensor]:
    """Recompute one block from its saved inputs, batch by batch, and backpropagate ``upstream``."""
    weights.onload([name])
    try:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
        parameters = {t.name: model.get_submodule(t.name).weight for t in targets}
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        sums: list[torch.Tensor] | None = None
        downstream = []
        with torch.enable_grad(), change(index, block) as leaves:
            wanted = {**parameters, **(leaves or {})}
            if not wanted and not input_gradient:
                return []
            for hidden, kw, gradient in zip(inputs, kwargs, upstream):
                hidden = hidden.detach().requires_grad_(input_gradient)
                got = torch.autograd.grad(block_output(block(hidden, **kw)), ([hidden] if input_gradient else []) +
                                          list(wanted.values()), grad_outputs=gradient, allow_unused=True)
                if input_gradient:
                    downstream.append(got[0])
                    got = got[1:]
                got = [torch.zeros_like(w) if g is None else g for w, g in zip(wanted.values(), got)]
                if sums is None:
                    sums = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in got]
                else:
                    for total, g in zip(sums, got):
                        total += g
        for parameter in parameters.values():
            parameter.requires_grad_(False)
        if wanted:
            on_block(index, dict(zip(wanted, sums)))
    finally:
        weights.offload([name])
    return downstream


@dataclass
class ModelStream:
    """The dense model as allocators may run it: block by block, from wherever its weights live (a model
    in memory, or a skeleton streamed from its checkpoint). ``store_dir`` holds the saved block inputs
    (None: a temporary folder).

    With several processes (``ranks``) every call is data parallel: each rank runs its contiguous share
    of the windows it is given, and the losses and gradients it returns are those of all the windows
    (each rank's weighted by its share of them, summed over the ranks), the same on every rank."""

    model: nn.Module
    targets: list[TargetModule]
    weights: ResidentWeights | None = None
    store_dir: Path | None = None
    ranks: Ranks | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = ResidentWeights(self.model)
        if self.ranks is None:
            self.ranks = Ranks()

    @property
    def blocks(self) -> int:
        return len(find_decoder_blocks(self.model, with_linears=False)[1])

    def tensor_names(self) -> list[str]:
        """Every stored tensor of the model; read one with ``weights.tensor(name)``."""
        return tensor_names(self.model, "")

    @property
    def device(self) -> torch.device:
        return self.weights.device

    def _share(self, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's windows and their share of all (every window has as many predicted tokens)."""
        share = self.ranks.window_share(windows.shape[0])
        mine = windows[share]
        return mine, mine.shape[0] / windows.shape[0]

    def _summed(self, values: torch.Tensor, weight: float, what: str) -> torch.Tensor:
        """``weight · values`` summed over the ranks (``values`` itself when alone)."""
        if not self.ranks.distributed:
            return values
        return self.ranks.all_reduce(values * weight, what)

    def weight_gradients(self, windows: torch.Tensor, batch_size: int, on_block: BlockGradients,
                         change: BlockChange | None = None, progress: Callable[..., None] | None = None, *,
                         weights_too: bool = True, reference: list[torch.Tensor] | None = None) -> float:
        """:func:`weight_gradients` of this model (its targets' weights unless not ``weights_too``: then
        only of the leaves ``change`` yields); ``progress`` advances twice per block. ``reference``
        comes from :meth:`final_hidden` on the same windows (this rank's share of them)."""
        mine, weight = self._share(windows)

        def summed(index: int, gradients: dict[str, torch.Tensor]) -> None:
            on_block(index, {key: self._summed(g, weight, f"summing the gradients of block {index}")
                             for key, g in gradients.items()})

        loss = weight_gradients(self.model, self.weights, self.targets if weights_too else [], mine, batch_size,
                                summed, store_dir=self.store_dir, change=change, progress=progress,
                                reference=reference)
        return float(self._summed(torch.tensor([loss], dtype=torch.float64), weight, "summing the loss"))

    def truncated(self, spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> BlockChange:
        """A change under which each target named in ``ranks`` computes with its rank-k whitened truncation
        ``A_k B_k`` (from ``spectra``) in place of its weight, in every block; the others keep theirs."""

        @contextlib.contextmanager
        def change(index: int, _block: nn.Module) -> Iterator[None]:
            swapped = []
            try:
                for target in (t for t in self.targets if t.block == index and t.name in ranks):
                    weight = self.model.get_submodule(target.name).weight
                    truncation = spectra[target.name].truncation(ranks[target.name])
                    swapped.append((weight, weight.data))
                    weight.data = truncation.to(dtype=weight.dtype, device=weight.device)
                yield
            finally:
                for weight, original in swapped:
                    weight.data = original

        return change

    def final_hidden(self, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """:func:`final_hidden` of this model on this rank's share of ``windows`` (the dense model's,
        for a KL reference)."""
        return final_hidden(self.model, self.weights, self._share(windows)[0], batch_size)

    def probe_losses(self, windows: torch.Tensor, batch_size: int, probes: Probes,
                     progress: Callable[..., None] | None = None) -> tuple[float, dict[Hashable, float]]:
        """:func:`probe_losses` on this model."""
        mine, weight = self._share(windows)
        dense, losses = probe_losses(self.model, self.weights, mine, batch_size, probes, store_dir=self.store_dir,
                                     progress=progress)
        values = self._summed(torch.tensor([dense, *losses.values()], dtype=torch.float64), weight,
                              "summing the probe losses").tolist()
        return values[0], dict(zip(losses, values[1:]))
