"""A live progress bar for a job: trials done/total, pruned, best so far, elapsed, ETA (rich)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class JobProgress:
    """Drives a rich Progress from trial counts; used by ``hpo run`` and ``hpo submit --wait``."""

    def __init__(self, total: int, *, objective: str, console: Console | None = None) -> None:
        self.objective = objective
        self.maximize = objective == "val_accuracy"
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("pruned {task.fields[pruned]}"),
            TextColumn("failed {task.fields[failed]}"),
            TextColumn("best {task.fields[best]}"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task(
            "trials", total=total, pruned=0, failed=0, best="-", status=""
        )

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def update(
        self,
        *,
        done: int,
        pruned: int,
        failed: int,
        best: float | None,
        status: str = "",
        total: int | None = None,
    ) -> None:
        best_s = f"{self.objective}={best:.4f}" if best is not None and math.isfinite(best) else "-"
        kwargs: dict[str, Any] = {
            "completed": done,
            "pruned": pruned,
            "failed": failed,
            "best": best_s,
            "status": status,
        }
        if total is not None:
            kwargs["total"] = total
        self.progress.update(self.task, **kwargs)
