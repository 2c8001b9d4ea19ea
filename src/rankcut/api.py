"""Saving a compressed model together with its report and a model card."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .artifacts import save_artifact
from .compress import CompressionReport


def report_markdown(report: CompressionReport) -> str:
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in report.summary_rows()]
    lines += ["", "| module | shape | rank | whitening |", "|---|---|---|---|"]
    for name, rank in report.plan.ranks.items():
        m, n = report.plan.shapes[name]
        path = report.diagnostics.get(name, {}).get("path", "")
        lines.append(f"| {name} | {m}x{n} | {rank} | {path} |")
    return "\n".join(lines) + "\n"


def model_card(report: CompressionReport, base_model: str | None) -> str:
    config = report.config
    return f"""---
library_name: transformers
tags: [rankcut, low-rank, svd, compression]
---
# Low-rank compressed model

Compressed with [rankcut](https://pypi.org/project/rankcut/) from `{base_model or 'unknown base model'}`:
keep ratio {config['keep_ratio']} of the decoder linear parameters, allocator `{config['allocator']}`,
whitening `{config['whitening']}`, {config['factor_format']} factors, calibration on
`{config['calibration']['dataset']}` ({config['calibration']['nsamples']} x {config['calibration']['seqlen']} tokens).

Load it with `import rankcut` followed by `rankcut.load(path)` or
`transformers.AutoModelForCausalLM.from_pretrained(path)`. No custom code runs on load.

{report_markdown(report)}"""


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, report: CompressionReport, *,
         base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` as a rankcut artifact (weights, config with the plan, tokenizer, report, card)."""
    settings = {**report.config, "base_model": base_model}
    return save_artifact(
        model, tokenizer, out_dir,
        plan=report.plan.to_dict(), settings=settings, diagnostics=report.diagnostics, measured=report.measured,
        extra_files={
            "README.md": model_card(report, base_model),
            "rankcut_report.json": json.dumps(report.to_dict(), indent=2, default=str),
            "rankcut_report.md": report_markdown(report),
        },
        overwrite=overwrite,
    )
