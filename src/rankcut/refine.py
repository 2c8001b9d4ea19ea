"""Block-level refinement: after a block is factorized, train its factors so that the block's output on
the compressed model's inputs matches the dense block's output on the dense inputs.

Only the factors train (plain ``A``, ``B`` or PivGa's pivot rows and coefficients; PivGa's pivot
indices, biases and norms stay), so the parameter count and the budget do not change. The loss is the
mean squared error normalized by the mean square of the dense outputs. Adam runs over batches of the
calibration windows in a seeded order; the block's error on all of its calibration data is measured
before and after, and the factors that give the smaller error are kept, so refinement never makes a
block worse on the data it saw.

Across processes each rank holds its share of the batches (``batches``: their indices among all of
them). The rank holding a step's batch computes its gradient, the others add zeros, and every rank
takes the same Adam step; sums over batches are taken in batch order. So the factors are the same, bit
for bit, as in one process.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .calibration import block_output
from .distributed import Ranks


def factor_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The trainable factors of factorized layers: every parameter but the bias."""
    return [p for module in modules for name, p in module.named_parameters() if name != "bias"]


def _in_batch_order(values: list[tuple], ranks: Ranks, what: str) -> list[tuple]:
    """Every rank's ``(batch, ...)`` tuples, sorted by batch."""
    return sorted(value for share in ranks.all_gather_object(values, what) for value in share)


@torch.no_grad()
def block_error(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                batches: Sequence[int] | None = None, ranks: Ranks | None = None) -> float:
    """``Σ ‖block(x) − y‖² / Σ ‖y‖²`` over the batches (every rank's), in float64."""
    ranks, batches = ranks or Ranks(), range(len(inputs)) if batches is None else batches
    terms = []
    for batch, x, y, kw in zip(batches, inputs, targets, kwargs):
        out = block_output(block(x, **kw))
        terms.append((batch, float((out.double() - y.double()).square().sum()), float(y.double().square().sum())))
    error = scale = 0.0
    for _, batch_error, batch_scale in _in_batch_order(terms, ranks, "summing the refined block's error"):
        error += batch_error
        scale += batch_scale
    return error / scale


def refine_block(block: nn.Module, modules: list[nn.Module], inputs: list[torch.Tensor], targets: list[torch.Tensor],
                 kwargs: list[dict], *, steps: int, lr: float, seed: int, batches: Sequence[int] | None = None,
                 ranks: Ranks | None = None) -> dict[str, Any]:
    """Train the factors of ``modules`` (inside ``block``) for ``steps`` Adam steps, one batch of
    ``inputs`` per step, towards the dense ``targets``; keep whichever factors give the smaller
    :func:`block_error`. ``batches``: the indices of this rank's batches among every rank's (default:
    all of them, one process). Returns the errors before and after and whether the trained factors were
    kept."""
    ranks, batches = ranks or Ranks(), list(range(len(inputs)) if batches is None else batches)
    parameters = factor_parameters(modules)
    before = block_error(block, inputs, targets, kwargs, batches, ranks)
    if not parameters or steps == 0:
        return {"error_before": before, "error_after": before, "kept": False}
    saved = [p.detach().clone() for p in parameters]
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    means = _in_batch_order([(batch, float(y.double().square().mean())) for batch, y in zip(batches, targets)],
                            ranks, "sharing the dense outputs' scale")
    scale = sum(mean for _, mean in means) / len(means)
    local = {batch: position for position, batch in enumerate(batches)}
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(means), generator=generator).tolist()
                batch = order.pop()
                optimizer.zero_grad(set_to_none=False)
                if batch in local:  # this rank holds the step's batch
                    position = local[batch]
                    # clones: the streams' tensors come out of inference mode, which autograd cannot save
                    out = block_output(block(inputs[position].clone(), **kwargs[position]))
                    loss = (out.float() - targets[position].clone().float()).square().mean() / scale
                    loss.backward()
                if ranks.distributed:
                    for parameter in parameters:
                        if parameter.grad is None:
                            parameter.grad = torch.zeros_like(parameter)
                        parameter.grad.copy_(ranks.all_reduce(parameter.grad, "sharing the refinement's gradients"))
                optimizer.step()
    finally:
        for parameter in block.parameters():
            parameter.requires_grad_(flags.get(id(parameter), True))
        for parameter in parameters:
            parameter.grad = None
    after = block_error(block, inputs, targets, kwargs, batches, ranks)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for parameter, original in zip(parameters, saved):
                parameter.copy_(original)
    return {"error_before": before, "error_after": min(before, after), "kept": kept}
