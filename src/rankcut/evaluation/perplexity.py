"""Perplexity as the SVD-compression papers measure it (GPTQ / SVD-LLM protocol, METHODS §6).

Join the split with a blank line, tokenize once, cut non-overlapping windows of ``seqlen`` tokens,
average the token NLL over all windows, exponentiate. Windows with a non-finite loss are counted and
reported, never dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from ..data import TextCorpus, bos_per_window, split_windows, tokenize_text
from ..errors import ConfigError
from ..progress import progress_bar


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return float("inf")


@dataclass
class PerplexityResult:
    dataset: str
    split: str
    seqlen: int
    perplexity: float
    mean_nll: float
    windows: int
    tokens: int  # text tokens in the evaluated windows
    scored_tokens: int  # predicted positions
    nonfinite_windows: int
    bos_per_window: bool
    seconds: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def model_context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window (``batch`` values, float64)."""
    device = next(model.parameters()).device
    windows = windows.to(device)
    logits = model(input_ids=windows, use_cache=False).logits
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="none"
    ).view(windows.shape[0], -1)
    return losses.double().sum(dim=1).cpu()


def evaluate_perplexity(
    model,
    tokenizer,
    corpus: TextCorpus,
    *,
    seqlen: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` (see the module docstring for the protocol)."""
    context = model_context_length(model)
    if seqlen < 2:
        raise ConfigError(f"seqlen must be at least 2, got {seqlen}")
    if context is not None and seqlen > context:
        raise ConfigError(f"seqlen {seqlen} is beyond the model's context length {context}")
    bos = bos_per_window(tokenizer)
    windows = split_windows(tokenize_text(tokenizer, corpus.joined()), seqlen, bos)
    if max_windows is not None:
        windows = windows[:max_windows]
    if windows.shape[0] == 0:
        raise ConfigError(f"{corpus.source} is shorter than one window of {seqlen} tokens")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    sums = []
    with progress_bar(f"ppl {corpus.name}/{corpus.split}", total=windows.shape[0], enabled=show_progress) as advance:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size]
            sums.append(window_nll(model, batch))
            advance(batch.shape[0])
    model.train(was_training)
    seconds = time.perf_counter() - start
    per_window = torch.cat(sums)
    nonfinite = int((~torch.isfinite(per_window)).sum())
    scored = windows.shape[0] * (seqlen - 1)
    mean_nll = float(per_window.sum() / scored)
    return PerplexityResult(
        dataset=corpus.name,
        split=corpus.split,
        seqlen=seqlen,
        perplexity=_exp(mean_nll),
        mean_nll=mean_nll,
        windows=windows.shape[0],
        tokens=windows.shape[0] * (seqlen - (bos is not None)),
        scored_tokens=scored,
        nonfinite_windows=nonfinite,
        bos_per_window=bos is not None,
        seconds=seconds,
        tokens_per_second=windows.numel() / seconds if seconds > 0 else float("inf"),
    )
