"""Streaming calibration: run the model one decoder block at a time (GPTQ's pattern).

Inputs of block 0 are captured once; each block then runs on the stored activations, its target
modules' input statistics are accumulated by forward hooks, a callback may factorize (and replace)
the block's modules, and the block's outputs become the next block's inputs. Only one block's
activations and statistics are resident at a time.

Memory: the stored activations take ``nsamples x seqlen x hidden x 4`` bytes (float32; 256 x 512 x 576
x 4 = 302 MB for SmolLM2, 2 GiB for a 4096-wide model), twice during a block (inputs and outputs),
plus the Grams of one block: ``8 x sum of distinct input widths²`` bytes (float64), plus the model.
The paired pass (:meth:`BlockStream.run_paired`: the compensating fit, block refinement) carries two
streams, the dense model's and the compressed model's; the compensating fit adds one input group's
cross-Gram (``8 x width²``) beside its Gram (with an anchor, the dense inputs' Gram too: another
``8 x width²``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .checkpoint import ResidentWeights
from .distributed import Ranks
from .errors import RankcutError
from .targets import TargetModule, find_decoder_blocks, set_submodule


@dataclass
class InputStatistics:
    """Second-moment statistics of one input tensor, shared by every module that reads it."""

    modules: list[str]  # names of the modules reading this tensor (q/k/v, gate/up)
    gram: torch.Tensor  # n x n float64, mean of x xᵀ over tokens
    abs_mean: torch.Tensor  # n float64, mean |x| per channel (ASVD scaling)
    tokens: int


@dataclass
class PairedStatistics(InputStatistics):
    """One input group of the compensating pass: ``gram`` and ``abs_mean`` of the inputs ``X̃`` the
    compressed model gives the group, ``cross``, the mean ``X X̃ᵀ`` with the dense model's inputs, and
    (when an anchor asks for it) ``dense_gram``, the mean ``X Xᵀ``."""

    cross: torch.Tensor | None = None  # n x n float64
    dense_gram: torch.Tensor | None = None  # n x n float64

    def fit_grams(self, compensation: float, anchor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gram ``G`` to whiten with and the cross-Gram ``C`` for the target ``W C S⁻ᵀ`` (``S Sᵀ = G``)
        whose whitened truncated SVD minimises, over rank-k ``W_k`` (means over tokens; α =
        ``compensation``, β = ``anchor``)::

            α ‖W X − W_k X̃‖² + (1 − α) ‖W X̃ − W_k X̃‖² + β ‖W X − W_k X‖²

        The quadratic terms in ``W_k`` sum to ``G = X̃X̃ᵀ + β XXᵀ``, the linear ones to ``C = α XX̃ᵀ +
        (1 − α) X̃X̃ᵀ + β XXᵀ``, so it is one square. α = 1 fits the dense outputs, compensating the
        upstream error; α = 0 fits the module's own weight on the inputs it will see. Where the
        compressed inputs lost a direction the dense ones carry, the compensating regression amplifies
        what is left of it in ``X̃`` (the weight grows along a direction of little energy); β > 0 keeps the
        dense fit there, because ``XXᵀ`` has that direction's energy."""
        cross = self.cross if compensation == 1.0 else compensation * self.cross + (1.0 - compensation) * self.gram
        if anchor == 0.0:
            return self.gram, cross
        if self.dense_gram is None:
            raise ValueError("an anchored fit needs the dense inputs' Gram: run the pass with dense_gram=True")
        return self.gram + anchor * self.dense_gram, cross + anchor * self.dense_gram


class _StopForward(Exception):
    pass


class _BlockRecorder(nn.Module):
    """Stands in for a decoder block while the model runs once per batch: records the block's
    keyword arguments (masks, rotary embeddings) and passes hidden states through unchanged."""

    def __init__(self, inner: nn.Module, index: int, last: bool, sink: dict[int, list]) -> None:
        super().__init__()
        self.inner, self.index, self.last, self.sink = inner, index, last, sink

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise RankcutError("decoder blocks called with positional arguments beyond hidden states are not supported")
        self.sink.setdefault(self.index, []).append((hidden_states if self.index == 0 else None, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class BlockRun:
    """What a block callback sees: the block, its index, its targets and their input statistics."""

    index: int
    block: nn.Module
    targets: list[TargetModule]
    statistics: dict[str, InputStatistics] = field(default_factory=dict)  # module name -> shared stats (owned)
    owners: dict[str, int] = field(default_factory=dict)  # module name -> the rank holding its statistics


class BlockStream:
    """Drives block-by-block calibration over ``calibration`` token ids (``nsamples x seqlen``).

    ``weights`` brings each block's parameters in before it runs and lets them go after (a skeleton
    streamed from its checkpoint); for a model in memory it does nothing. It also says where the blocks
    run."""

    def __init__(self, model: nn.Module, targets: list[TargetModule], calibration: torch.Tensor, batch_size: int = 8,
                 *, weights: ResidentWeights | None = None, ranks: Ranks | None = None):
        self.model, self.targets = model, targets
        self.prefix, self.blocks = find_decoder_blocks(model)
        self.weights = weights or ResidentWeights(model)
        self.device = self.weights.device
        self.ranks = ranks or Ranks()
        every = list(calibration.split(batch_size))
        self.batch_count = len(every)
        self.batch_indices = self.ranks.batch_indices(self.batch_count)  # this rank's share, among all batches
        self.batches = [every[b] for b in self.batch_indices]

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    @torch.no_grad()  # not inference mode: the keyword tensors (rotary embeddings) may enter autograd later
    def capture(self) -> tuple[list[torch.Tensor], dict[int, list[dict]]]:
        """The inputs of block 0 (one tensor per batch) and every block's keyword arguments per batch
        (masks, rotary embeddings): the model runs once per batch up to its last block."""
        sink: dict[int, list] = {}
        originals = list(self.blocks)
        embedding = next(name for name, module in self.model.named_modules()
                         if module is self.model.get_input_embeddings())
        self.weights.onload([embedding])
        for index, block in enumerate(originals):
            self.blocks[index] = _BlockRecorder(block, index, index == len(originals) - 1, sink)
        try:
            for batch in self.batches:
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            for index, block in enumerate(originals):
                self.blocks[index] = block
            self.weights.offload([embedding])
        hidden = [h for h, _ in sink[0]]
        kwargs = {index: [k for _, k in records] for index, records in sink.items()}
        return hidden, kwargs

    def run(self, on_block: Callable[[BlockRun], None], *, closed_loop: bool = False,
            progress: Callable[..., None] | None = None, start_block: int = 0,
            hidden: list[torch.Tensor] | None = None,
            on_outputs: Callable[[int, list[torch.Tensor]], None] | None = None) -> None:
        """Call ``on_block`` after each block's statistics are collected.

        ``on_block`` may replace the block's modules. With ``closed_loop`` the block is run again
        after the callback so the next block sees the outputs of the compressed block (sequential
        calibration); otherwise it sees the dense block's outputs.

        To resume an interrupted run, pass ``start_block`` and ``hidden``, the inputs of that block
        (one tensor per batch) saved by ``on_outputs(next_block, inputs_of_next_block)``, which is
        called after every block. Blocks before ``start_block`` are not run again; the model still
        runs once up to the first block to capture every block's keyword arguments (cheap).
        """
        captured, block_kwargs = self.capture()
        if hidden is None:
            if start_block:
                raise ValueError("resuming at a later block needs the hidden states entering it")
            hidden = captured
        elif len(hidden) != len(captured):  # zip would silently drop batches
            raise RankcutError(f"resumed activations hold {len(hidden)} batches, the calibration data {len(captured)}")
        del captured
        by_block: dict[int, list[TargetModule]] = {}
        for target in self.targets:
            by_block.setdefault(target.block, []).append(target)
        for index in range(start_block, len(self.blocks)):
            block = self.blocks[index]
            run = BlockRun(index, block, by_block.get(index, []))
            self.weights.onload([self.block_name(index)])
            with torch.inference_mode():
                outputs = self._run_block(block, hidden, block_kwargs[index], run)
            on_block(run)
            if closed_loop and run.targets:
                outputs = self.forward_block(block, hidden, block_kwargs[index])
            self.weights.offload([self.block_name(index)])
            hidden = outputs
            if on_outputs is not None:
                on_outputs(index + 1, hidden)
            if progress is not None:
                progress(1)

    def run_paired(self, fit_block: Callable[[int, nn.Module, Mapping[str, nn.Module], list, list, list], None],
                   on_block: Callable[[int], None], *,
                   refine: Callable[[int, nn.Module, list, list, list], None] | None = None,
                   progress: Callable[..., None] | None = None, start_block: int = 0,
                   hidden: list[torch.Tensor] | None = None,
                   on_outputs: Callable[[int, list[torch.Tensor]], None] | None = None) -> None:
        """The dense model and the compressed one side by side, block by block. For each block,
        ``fit_block(index, block, dense_modules, dense_inputs, compressed_inputs, kwargs)`` replaces its
        targets (``dense_modules``: the dense ones, by name); then ``refine(index, block,
        compressed_inputs, dense_outputs, kwargs)`` may train the block's factors towards the dense
        block's outputs, and ``on_block(index)`` follows. Both paths then move on: the dense block's
        outputs and the compressed block's.

        Resume as :meth:`run`, with ``hidden`` the dense inputs of ``start_block`` followed by the
        compressed ones, as ``on_outputs`` receives them.
        """
        captured, block_kwargs = self.capture()
        count = len(captured)
        if hidden is None:
            if start_block:
                raise ValueError("resuming at a later block needs the hidden states entering it")
            dense, compressed = captured, captured
        elif len(hidden) != 2 * count:
            raise RankcutError(f"resumed activations hold {len(hidden)} batches, the paired pass {2 * count}")
        else:
            dense, compressed = hidden[:count], hidden[count:]
        del captured
        for index in range(start_block, len(self.blocks)):
            block, kwargs = self.blocks[index], block_kwargs[index]
            self.weights.onload([self.block_name(index)])
            originals = {t.name: self.model.get_submodule(t.name) for t in self.targets if t.block == index}
            fit_block(index, block, originals, dense, compressed, kwargs)
            with self._swapped(originals):
                dense_outputs = self.forward_block(block, dense, kwargs)
            if refine is not None:
                refine(index, block, compressed, dense_outputs, kwargs)
            on_block(index)
            dense, compressed = dense_outputs, self.forward_block(block, compressed, kwargs)
            self.weights.offload([self.block_name(index)])
            if on_outputs is not None:
                on_outputs(index + 1, dense + compressed)
            if progress is not None:
                progress(1)

    def fit_compensating(self, on_group: Callable[[int, tuple[str, ...], int, PairedStatistics | None], None], *,
                         dense_gram: bool = False) -> Callable[[int, nn.Module, Mapping[str, nn.Module], list, list,
                                                                list], None]:
        """A ``fit_block`` for :meth:`run_paired` that goes input group by input group, in the order the
        data flows (q/k/v, then o; gate/up, then down: the order the modules are called in, not their
        names). For each group, ``on_group(block, modules, owner, stats)`` gets the compressed path's
        inputs ``X̃`` (after the groups before it were replaced) with their cross-Gram against the dense
        inputs ``X`` (and, with ``dense_gram``, the Gram of ``X``), and replaces the group's modules; with
        several processes the statistics are summed at the group's ``owner`` rank as in :meth:`run` (bit
        for bit those of one process) and the others get None."""

        def fit_block(index: int, block: nn.Module, originals: Mapping[str, nn.Module], dense: list,
                      compressed: list, kwargs: list) -> None:
            groups = self._groups_in_flow_order(block, dense[0], kwargs[0], list(originals))
            owners = self.ranks.assign(groups, {t.name: t.shape for t in self.targets if t.block == index})
            for group in groups:
                owner = owners[group[0]]
                statistics = self._paired_statistics(block, group, originals, dense, compressed, kwargs,
                                                     dense_gram, owner, f"summing the compensating statistics "
                                                     f"of block {index}")
                on_group(index, group, owner, statistics)

        return fit_block

    @contextlib.contextmanager
    def _swapped(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """``modules`` in place of whatever the model holds under their names, meanwhile."""
        current = {name: self.model.get_submodule(name) for name in modules}
        for name, module in modules.items():
            set_submodule(self.model, name, module)
        try:
            yield
        finally:
            for name, module in current.items():
                set_submodule(self.model, name, module)

    @torch.inference_mode()
    def _groups_in_flow_order(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict,
                              names: list[str]) -> list[tuple[str, ...]]:
        """The block's target modules grouped by shared input, in the order they are first called."""
        seen: dict[str, torch.Tensor] = {}
        handles = [self.model.get_submodule(name).register_forward_hook(
            lambda _m, inputs, _o, name=name: seen.__setitem__(name, inputs[0])) for name in names]
        try:
            block(hidden, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return [group for group, _ in _group_by_identity(seen)]

    @torch.inference_mode()
    def _paired_statistics(self, block: nn.Module, group: tuple[str, ...], originals: Mapping[str, nn.Module],
                           dense: list[torch.Tensor], compressed: list[torch.Tensor],
                           kwargs: list[dict], with_dense_gram: bool, owner: int, what: str) -> PairedStatistics | None:
        """The group's statistics at ``owner`` (None on other ranks), summed over the batches in batch
        order: the ranks step through their batches together, as in :meth:`_run_block`."""
        slot: list = [None, None, 0]  # Σ x̃x̃ᵀ (upper), Σ|x̃|, tokens
        cross = dense_upper = None  # Σ x x̃ᵀ, Σ x xᵀ (upper)
        shapes: list[torch.Size] = []
        for step in range(-(-self.batch_count // self.ranks.world_size)):
            if step < len(dense):
                with self._swapped(originals):
                    x = self._input_of(block, dense[step], kwargs[step], group[0])
                x_tilde = self._input_of(block, compressed[step], kwargs[step], group[0])
                gram, abs_sum, tokens = _batch_partial(x_tilde)
                x = x.reshape(-1, x.shape[-1]).float()
                parts = [gram, abs_sum, x.T @ x_tilde.reshape(-1, x_tilde.shape[-1]).float()]
                parts += [_gram_upper(x)] if with_dense_gram else []
                shapes = [part.shape for part in parts]
            else:  # this rank has run all its batches: it sends zeros with no tokens (every rank has step 0)
                parts, tokens = [torch.zeros(shape, device=self.device) for shape in shapes], 0
            for gram, abs_sum, product, *dense_part, count in self._gathered(
                    [*parts, torch.tensor([tokens], device=self.device)], owner, what):
                _add(slot, gram, abs_sum, count)
                cross = product.double().cpu() if cross is None else cross + product.double().cpu()
                if dense_part:
                    part = dense_part[0].double().cpu()
                    dense_upper = part if dense_upper is None else dense_upper + part
        if slot[0] is None:
            return None
        tokens = slot[2]
        return PairedStatistics(list(group), _symmetric(slot[0]) / tokens, slot[1] / tokens, tokens, cross / tokens,
                                _symmetric(dense_upper) / tokens if with_dense_gram else None)

    def _gathered(self, partials: list[torch.Tensor], owner: int, what: str) -> list[tuple[torch.Tensor, ...]]:
        """Every rank's ``partials`` (the last: its token count) at ``owner``, in rank order, leaving out
        ranks that ran no batch at this step; empty on the other ranks."""
        received = [self.ranks.gather(part, owner, what) for part in partials]
        if received[0] is None:
            return []
        return [parts for parts in zip(*received) if int(parts[-1])]

    def _input_of(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict, name: str) -> torch.Tensor:
        """The input module ``name`` receives when ``block`` runs on ``hidden`` (the block stops there)."""
        captured: list[torch.Tensor] = []

        def stop(_module, inputs):
            captured.append(inputs[0])
            raise _StopForward

        handle = self.model.get_submodule(name).register_forward_pre_hook(stop)
        try:
            block(hidden, **kwargs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    @staticmethod
    @torch.inference_mode()
    def forward_block(block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
        """The block's outputs on ``hidden`` (one tensor per batch), nothing recorded."""
        return [block_output(block(h, **kw)) for h, kw in zip(hidden, kwargs)]

    def _run_block(self, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], run: BlockRun) -> list[torch.Tensor]:
        """Run this rank's batches through ``block`` and sum each input group's statistics at its owner
        rank (:meth:`Ranks.assign`). The ranks step through the batches together: at step ``s`` rank
        ``r`` runs batch ``s·N + r``, and the owner adds the gathered per-batch sums in batch order, so
        every Gram is the same, bit for bit, for any number of ranks."""
        modules = {t.name: self.model.get_submodule(t.name) for t in run.targets}
        seen: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(lambda _m, inputs, _o, name=name: seen.__setitem__(name, inputs[0]))
            for name, module in modules.items()
        ]
        ranks = self.ranks
        groups: list[tuple[str, ...]] | None = None
        widths: dict[tuple[str, ...], int] = {}
        accumulators: dict[tuple[str, ...], list] = {}
        outputs = []
        try:
            for step in range(-(-self.batch_count // ranks.world_size)):
                found: dict[tuple[str, ...], torch.Tensor] = {}
                if step < len(hidden):
                    seen.clear()
                    outputs.append(block_output(block(hidden[step], **kwargs[step])))
                    found = dict(_group_by_identity(seen))
                    if groups is None:
                        groups = list(found)
                        self._check_ran(modules, groups)
                        widths = {group: tensor.shape[-1] for group, tensor in found.items()}
                        run.owners.update(ranks.assign(groups, {t.name: t.shape for t in run.targets}))
                for group in groups:  # one group's partial sums at a time, as they are gathered and added
                    width = widths[group]
                    gram, abs_sum, tokens = _batch_partial(found[group]) if group in found else (
                        torch.zeros(width, width, device=self.device), torch.zeros(width, device=self.device), 0)
                    what, owner = f"summing the calibration statistics of block {run.index}", run.owners[group[0]]
                    for parts in self._gathered([gram, abs_sum, torch.tensor([tokens], device=self.device)], owner,
                                                what):
                        _add(accumulators.setdefault(group, [None, None, 0]), *parts)
        finally:
            for handle in handles:
                handle.remove()
            seen.clear()
        for group, (gram, abs_sum, tokens) in accumulators.items():
            stats = InputStatistics(list(group), _symmetric(gram) / tokens, abs_sum / tokens, tokens)
            for name in group:
                run.statistics[name] = stats
        return outputs

    @staticmethod
    def _check_ran(modules: Mapping[str, nn.Module], groups: list[tuple[str, ...]]) -> None:
        missing = set(modules) - {name for group in groups for name in group}
        if missing:
            raise RankcutError(f"target modules never ran during calibration: {sorted(missing)[:5]}")


def _group_by_identity(seen: dict[str, torch.Tensor]) -> Iterator[tuple[tuple[str, ...], torch.Tensor]]:
    """Modules that received the very same tensor object share statistics (q/k/v, gate/up)."""
    groups: list[tuple[list[str], torch.Tensor]] = []
    for name, tensor in seen.items():
        for names, other in groups:
            if other is tensor:
                names.append(name)
                break
        else:
            groups.append(([name], tensor))
    for names, tensor in groups:
        yield tuple(names), tensor


def _gram_upper(x: torch.Tensor, width: int = 256) -> torch.Tensor:
    """The upper triangle of ``xᵀ x`` for a ``tokens x n`` batch (below the diagonal blocks: zeros).

    Computed as block rows ``x[:, i]ᵀ x[:, i:]`` of ``width`` columns, which skips most of the lower
    triangle: calibration spends about as long on Grams as on the forward, and this takes a third
    off them on CPU (SmolLM2 widths 576 and 1536, 2 cores; 256 measured best of 128-768)."""
    n = x.shape[1]
    upper = x.new_zeros(n, n)
    for start in range(0, n, width):
        upper[start:start + width, start:] = x[:, start:start + width].T @ x[:, start:]
    return upper


def _symmetric(upper: torch.Tensor) -> torch.Tensor:
    return upper.triu() + upper.triu(1).T


def _batch_partial(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batch's ``Σ x xᵀ`` (upper triangle) and ``Σ |x|`` in float32 (what a rank sends to the
    group's owner), and its token count."""
    x = tensor.detach().reshape(-1, tensor.shape[-1]).float()
    gram = _gram_upper(x)  # summed as triangles, made symmetric once the block is done
    # Each diagonal entry is a sum of squares: NaN or Inf in any activation shows there, at O(n) cost.
    if not torch.isfinite(gram.diagonal()).all():
        raise RankcutError("calibration activations contain NaN or Inf (or overflow float32); "
                           "check the model weights and dtype")
    return gram, x.abs().sum(dim=0), x.shape[0]


def _add(slot: list, gram: torch.Tensor, abs_sum: torch.Tensor, tokens: torch.Tensor | int) -> None:
    """Add one batch's partial sums (:func:`_batch_partial`) to ``slot``'s float64 totals."""
    gram, abs_sum = gram.double().cpu(), abs_sum.double().cpu()
    if slot[0] is None:
        slot[0], slot[1] = gram, abs_sum
    else:
        slot[0] += gram
        slot[1] += abs_sum
    slot[2] += int(tokens)

