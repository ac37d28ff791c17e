"""Progress per model and stage: rich bars in a terminal, plain log lines otherwise.

    with make_reporter() as rep:  set_progress(rep); ...
    rep.start("organism", "extract", planned=8, done=3); rep.advance("organism", "extract")
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("refdir.progress")


class LogReporter:
    """One line per finished job: 'organism extract 4/8'."""

    def __init__(self):
        self._state: dict[tuple[str, str], list[int]] = {}

    def start(self, model: str, stage: str, planned: int, done: int) -> None:
        self._state[(model, stage)] = [done, planned]
        logger.info("%s %s: %d/%d jobs already done", model, stage, done, planned)

    def advance(self, model: str, stage: str) -> None:
        s = self._state.setdefault((model, stage), [0, 0])
        s[0] += 1
        logger.info("%s %s %d/%d", model, stage, s[0], s[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class RichReporter(LogReporter):
    def __init__(self):
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), transient=False)
        self._tasks: dict[tuple[str, str], int] = {}

    def start(self, model: str, stage: str, planned: int, done: int) -> None:
        key = (model, stage)
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(f"{model} {stage}", total=planned)
        self._progress.update(self._tasks[key], total=planned, completed=done)

    def advance(self, model: str, stage: str) -> None:
        if (model, stage) in self._tasks:
            self._progress.advance(self._tasks[(model, stage)])

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()


def make_reporter(plain: bool | None = None) -> LogReporter:
    if plain is None:
        plain = not sys.stderr.isatty()
    return LogReporter() if plain else RichReporter()
