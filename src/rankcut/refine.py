"""Block-level refinement: after a block is factorized, train its factors so that the block's output on
the compressed model's inputs matches the dense block's output on the dense inputs.

Only the factors train (plain ``A``, ``B`` or PivGa's pivot rows and coefficients; PivGa's pivot
indices, biases and norms stay), so the parameter count and the budget do not change. The loss is the
mean squared error normalized by the mean square of the dense outputs. Adam runs over batches of the
calibration windows in a seeded order; the block's error on all of its calibration data is measured
before and after, and the factors that give the smaller error are kept, so refinement never makes a
block worse on the data it saw.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .calibration import block_output


def factor_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The trainable factors of factorized layers: every parameter but the bias."""
    return [p for module in modules for name, p in module.named_parameters() if name != "bias"]


@torch.no_grad()
def block_error(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict]) -> float:
    """``Σ ‖block(x) − y‖² / Σ ‖y‖²`` over the batches, in float64."""
    error = scale = 0.0
    for x, y, kw in zip(inputs, targets, kwargs):
        out = block_output(block(x, **kw))
        error += float((out.double() - y.double()).square().sum())
        scale += float(y.double().square().sum())
    return error / scale


def refine_block(block: nn.Module, modules: list[nn.Module], inputs: list[torch.Tensor], targets: list[torch.Tensor],
                 kwargs: list[dict], *, steps: int, lr: float, seed: int) -> dict[str, Any]:
    """Train the factors of ``modules`` (inside ``block``) for ``steps`` Adam steps, one batch of
    ``inputs`` per step, towards the dense ``targets``; keep whichever factors give the smaller
    :func:`block_error`. Returns the errors before and after and whether the trained factors were kept."""
    parameters = factor_parameters(modules)
    before = block_error(block, inputs, targets, kwargs)
    if not parameters or steps == 0:
        return {"error_before": before, "error_after": before, "kept": False}
    saved = [p.detach().clone() for p in parameters]
    flags = {id(p): p.requires_grad for p in block.parameters()}
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    scale = sum(float(y.double().square().mean()) for y in targets) / len(targets)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(inputs), generator=generator).tolist()
                batch = order.pop()
                # clones: the streams' tensors come out of inference mode, which autograd cannot save
                out = block_output(block(inputs[batch].clone(), **kwargs[batch]))
                loss = (out.float() - targets[batch].clone().float()).square().mean() / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for parameter in block.parameters():
            parameter.requires_grad_(flags.get(id(parameter), True))
        for parameter in parameters:
            parameter.grad = None
    after = block_error(block, inputs, targets, kwargs)
    kept = after < before
    if not kept:
        with torch.no_grad():
            for parameter, original in zip(parameters, saved):
                parameter.copy_(original)
    return {"error_before": before, "error_after": min(before, after), "kept": kept}
