"""Text corpora for calibration and evaluation, found locally first and on the hub when online.

Named datasets (``wikitext2``, ``ptb``, ``c4``) resolve to a local data folder laid out like
``shared/data`` (``--data-dir`` or ``RANKCUT_DATA``), then to Hugging Face ``datasets``. Paths to
``.txt``, ``.jsonl`` (field ``text``) and ``.parquet`` (column ``text``) files work too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._settings import data_dirs
from .errors import ConfigError, DataNotFoundError

SPLIT_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


@dataclass(frozen=True)
class TextCorpus:
    """Rows of text. ``documents`` marks corpora of whole documents (C4) as opposed to lines of one
    long text (WikiText-2, PTB), which changes how calibration windows are drawn."""

    name: str
    split: str
    rows: list[str]
    documents: bool
    source: str

    def joined(self) -> str:
        """The evaluation text: rows joined with a blank line (GPTQ / SVD-LLM protocol)."""
        return "\n\n".join(self.rows)


def _wikitext_rows(text: str) -> list[str]:
    # Hugging Face wikitext-2-raw-v1 rows: one per line, keeping "\n"; whitespace-only lines become "".
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _ptb_rows(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def _read_jsonl(path: Path) -> list[str]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise DataNotFoundError(f"{path}:{number}: expected a JSON object with a 'text' field ({error})") from error
    return rows


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataNotFoundError(f"{path} has no 'text' column (columns: {table.column_names})")
    return [str(value) for value in table.column("text").to_pylist()]


@dataclass(frozen=True)
class NamedDataset:
    files: dict[str, str]  # split -> path relative to a data folder
    read: Callable[[Path], list[str]]
    documents: bool
    hub: tuple[str, str | None, str]  # (path, config, text field) for datasets.load_dataset


NAMED: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        {"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw",
         "train": "wikitext-2-raw/wiki.train.raw"},
        lambda p: _wikitext_rows(p.read_text(encoding="utf-8").replace("\r\n", "\n")), False,
        ("wikitext", "wikitext-2-raw-v1", "text")),
    "ptb": NamedDataset(
        {"test": "ptb/ptb.test.txt", "validation": "ptb/ptb.valid.txt", "train": "ptb/ptb.train.txt"},
        lambda p: _ptb_rows(p.read_text(encoding="utf-8")), False, ("ptb_text_only", "penn_treebank", "sentence")),
    "c4": NamedDataset(
        {"validation": "c4/c4_validation_2k.parquet"}, _read_parquet, True,
        ("allenai/c4", "en", "text")),
}


def _read(path: Path, read: Callable[[Path], list[str]]) -> list[str]:
    """``read(path)``, with any failure to read or decode the file reported as a DataNotFoundError."""
    try:
        return read(path)
    except DataNotFoundError:
        raise
    except UnicodeDecodeError as error:
        raise DataNotFoundError(f"cannot read {path}: it is not UTF-8 text ({error})") from error
    except Exception as error:  # OSError (permissions, ...); pyarrow raises its own types for broken files
        raise DataNotFoundError(f"cannot read {path}: {error}") from error


def _from_path(path: Path, split: str) -> TextCorpus:
    if path.is_dir():
        raise DataNotFoundError(f"{path} is a folder; expected a .txt, .jsonl or .parquet file")
    if not path.is_file():
        raise DataNotFoundError(f"data file not found: {path}")
    if path.suffix == ".jsonl":
        return TextCorpus(path.name, split, _read(path, _read_jsonl), True, str(path))
    if path.suffix == ".parquet":
        return TextCorpus(path.name, split, _read(path, _read_parquet), True, str(path))
    rows = _read(path, lambda p: _wikitext_rows(p.read_text(encoding="utf-8")))
    return TextCorpus(path.name, split, rows, False, str(path))


def load_text(name_or_path: str | os.PathLike, split: str = "test", *, data_dir: str | os.PathLike | None = None) -> TextCorpus:
    """Load a corpus by name (``wikitext2``, ``ptb``, ``c4``) or from a file path."""
    split = SPLIT_ALIASES.get(split, split)
    text = str(name_or_path)
    if text not in NAMED:
        path = Path(text).expanduser()
        if path.suffix in {".txt", ".raw", ".jsonl", ".parquet"} or path.exists():
            return _from_path(path, split)
        raise DataNotFoundError(f"unknown dataset {text!r}: expected one of {sorted(NAMED)} or a .txt/.jsonl/.parquet file")
    dataset = NAMED[text]
    tried: list[str] = []
    relative = dataset.files.get(split)
    for folder in data_dirs(data_dir):
        if relative is None:
            tried.append(f"{folder}: no local file for split {split!r} (local splits: {sorted(dataset.files)})")
            continue
        candidate = folder / relative
        if candidate.is_file():
            return TextCorpus(text, split, _read(candidate, dataset.read), dataset.documents, str(candidate))
        tried.append(str(candidate))
    if not data_dirs(data_dir):
        tried.append("no local data folder (set RANKCUT_DATA or pass --data-dir)")
    rows = _from_hub(dataset, split, tried)
    if rows is not None:
        return TextCorpus(text, split, rows, dataset.documents, f"hub:{dataset.hub[0]}")
    places = "\n  - ".join(tried)
    raise DataNotFoundError(f"dataset {text!r} split {split!r} not found. Tried:\n  - {places}")


def _from_hub(dataset: NamedDataset, split: str, tried: list[str]) -> list[str] | None:
    path, config, field = dataset.hub
    try:
        import datasets
    except ImportError:
        tried.append(f"Hugging Face hub {path} (the `datasets` package is not installed)")
        return None
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline, unknown split, ...: report and move on
        tried.append(f"Hugging Face hub {path}/{config} ({error.__class__.__name__}: {str(error)[:200]})")
        return None
    return [str(row) for row in data[field]]


# ---------------------------------------------------------------------------------------------
# Tokenization and windows


def bos_per_window(tokenizer) -> int | None:
    """The BOS id when the tokenizer's own settings prepend it (e.g. Gemma), else None.

    Such models were trained with BOS first and must see it at the start of every window.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a").input_ids
    return bos if probe and probe[0] == bos else None


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as one long 1-D tensor."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def split_windows(ids: torch.Tensor, seqlen: int, bos: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens (BOS + ``seqlen - 1`` text tokens when needed)."""
    body = seqlen - (bos is not None)
    count = ids.numel() // body
    windows = ids[: count * body].view(count, body)
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def sample_calibration(tokenizer, corpus: TextCorpus, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens drawn with ``seed`` (``nsamples x seqlen`` ids).

    Document corpora (C4): pick random documents at least ``seqlen`` tokens long and a random window
    inside each (GPTQ / SVD-LLM). Line corpora (WikiText-2, PTB): random windows of the joined text.
    """
    if nsamples < 1 or seqlen < 2:
        raise ConfigError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    bos = bos_per_window(tokenizer)
    body = seqlen - (bos is not None)
    generator = torch.Generator().manual_seed(seed)
    if corpus.documents:
        order = torch.randperm(len(corpus.rows), generator=generator).tolist()
        windows = []
        for index in order:
            ids = tokenize_text(tokenizer, corpus.rows[index])
            if ids.numel() < body:
                continue
            start = int(torch.randint(0, ids.numel() - body + 1, (1,), generator=generator))
            windows.append(ids[start : start + body])
            if len(windows) == nsamples:
                break
        if len(windows) < nsamples:
            raise ConfigError(
                f"{corpus.source} has only {len(windows)} documents of at least {body} tokens; "
                f"{nsamples} calibration windows were requested (lower --nsamples or --seqlen)"
            )
        stacked = torch.stack(windows)
    else:
        ids = tokenize_text(tokenizer, corpus.joined())
        if ids.numel() < nsamples * body:
            raise ConfigError(
                f"{corpus.source} has {ids.numel()} tokens, fewer than the {nsamples} x {body} requested for calibration"
            )
        starts = torch.randint(0, ids.numel() - body + 1, (nsamples,), generator=generator)
        stacked = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos is not None:
        stacked = torch.cat([torch.full((nsamples, 1), bos, dtype=torch.long), stacked], dim=1)
    return stacked


def select_windows(calibration: torch.Tensor, count: int | None, seed: int) -> torch.Tensor:
    """``count`` calibration rows chosen with ``seed`` (all rows, in order, when None or too many)."""
    if count is None or count >= calibration.shape[0]:
        return calibration
    order = torch.randperm(calibration.shape[0], generator=torch.Generator().manual_seed(seed))
    return calibration[order[:count]]
