"""Saving a compressed model held in memory together with its report and a model card."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .artifacts import save_artifact
from .compress import CompressionReport


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: CompressionReport, *,
         base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a rankcut artifact (weights, config with the plan, tokenizer, report, card)."""
    settings = {**report.config, "base_model": base_model}
    return save_artifact(model, tokenizer, out_dir, plan=report.plan.to_dict(), settings=settings,
                         diagnostics=report.diagnostics, measured=report.measured,
                         extra_files=report.files(base_model), overwrite=overwrite)
