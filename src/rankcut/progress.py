"""One progress-bar helper (rich) so every long phase reports the same way."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yield ``advance(steps=1, **fields)``; ``fields`` (loss, ratio, ...) are shown beside the bar."""
    if not enabled:
        yield lambda steps=1, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(steps: int = 1, **fields: object) -> None:
            status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=steps, status=status)

        yield advance
