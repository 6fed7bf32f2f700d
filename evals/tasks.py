"""The task registry and the evaluation grid: which generator, which scorer, which cells.

A `Task` turns ``(tokenizer, length, depth, rng, fmt)`` into a `Sample`; ``metric`` names the
scorer (`evals.scoring.METRICS`). `grid` lists the cells (task × length × depth) and
`cell_samples` makes a cell's samples from seeds derived from (seed, task, length, depth,
index), so any cell can be regenerated alone.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evals.qa import qa_sample
from evals.ruler import RULER_TASKS, ruler_sample
from text.synthetic import PromptFormat, Sample, niah_sample, passkey_sample


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[..., Sample]  # (tokenizer, length, depth, rng, fmt) -> Sample
    metric: str = "all"
    uses_depth: bool = False  # depth is a grid axis (passkey, niah); otherwise random per sample


def passkey_task(filler: str = "classic", template: str = "classic") -> Task:
    return Task(
        "passkey",
        lambda tok, n, d, rng, fmt: passkey_sample(tok, n, d, rng, filler, fmt, template=template),
        uses_depth=True,
    )


def niah_task(haystack: str = "prose", needle: str | None = None, question: str | None = None, answer=None) -> Task:
    kw = {k: v for k, v in dict(needle=needle, question=question, answer=answer).items() if v is not None}
    return Task(
        "niah",
        lambda tok, n, d, rng, fmt: niah_sample(tok, n, d, rng, haystack=haystack, fmt=fmt, **kw),
        uses_depth=True,
    )


def ruler_task(name: str) -> Task:
    if name not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {name!r}: use one of {', '.join(RULER_TASKS)}, or qa with a QA file.")
    return Task(name, lambda tok, n, d, rng, fmt: ruler_sample(name, tok, n, rng, fmt))


def qa_task(path: str) -> Task:
    return Task("qa", lambda tok, n, d, rng, fmt: qa_sample(tok, n, rng, path, fmt), metric="part")


@dataclass(frozen=True)
class Cell:
    task: str
    length: int
    depth: float | None  # a fraction in [0, 1]; None for tasks without a depth axis


def grid(tasks: Sequence[Task], lengths: Sequence[int], depths: Sequence[float]) -> list[Cell]:
    """Cells in evaluation order: task, then length, then depth."""
    cells = []
    for task in tasks:
        for length in lengths:
            for depth in depths if task.uses_depth else [None]:
                cells.append(Cell(task.name, length, depth))
    return cells


def cell_rng(seed: int, cell: Cell, index: int) -> np.random.Generator:
    """A generator for sample ``index`` of ``cell``, independent of which other cells run."""
    depth_key = -1 if cell.depth is None else int(round(cell.depth * 1e6))
    entropy = [seed, zlib.crc32(cell.task.encode()), cell.length, depth_key, index]
    return np.random.default_rng(np.random.SeedSequence([e % 2**32 for e in entropy]))


def cell_samples(task: Task, cell: Cell, tokenizer, samples: int, seed: int, fmt: PromptFormat | None) -> list[Sample]:
    depth = 0.5 if cell.depth is None else cell.depth
    return [task.make(tokenizer, cell.length, depth, cell_rng(seed, cell, i), fmt) for i in range(samples)]
