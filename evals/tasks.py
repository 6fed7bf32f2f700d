"""The eval task registry and the evaluation grid: which generator, which scorer, which cells.

`TASKS` is the one list of eval tasks: name → `TaskSpec` (the ``python -m evals`` command that
runs it, how its sample generator is built from `TaskSettings`, its scorer, whether depth is a
grid axis). The CLI (`evals.cli`) and the end-of-stage evals (`train.stage_eval`) both build
tasks from it with `make_task` / `command_tasks`, so a new task is one entry here — or, for a
RULER-style task, one entry in `evals.ruler.RULER_TASKS`, whose rows this registry takes in.

A `Task` turns ``(tokenizer, length, depth, rng, fmt)`` into a `Sample`; ``metric`` names the
scorer (`evals.scoring.METRICS`). `grid` lists the cells (task × length × depth) and
`cell_samples` makes a cell's samples from seeds derived from (seed, task, length, depth,
index), so any cell can be regenerated alone.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from evals.loading import EvalInputError
from evals.qa import load_qa, qa_sample
from evals.ruler import RULER_TASKS, ruler_sample
from text.haystack import load_haystack
from text.synthetic import PASSKEY_TEMPLATES, PromptFormat, Sample, niah_sample, passkey_sample

SampleFn = Callable[..., Sample]  # (tokenizer, length, depth, rng, fmt) -> Sample


@dataclass(frozen=True)
class Task:
    name: str
    make: SampleFn
    metric: str = "all"
    uses_depth: bool = False  # depth is a grid axis (passkey, niah); otherwise random per sample


@dataclass(frozen=True)
class TaskSettings:
    """What tasks read besides ``(tokenizer, length, depth, rng, fmt)``: the CLI's flags, a stage's eval config."""

    filler: str = "classic"  # passkey filler: classic, prose or a text file
    template: str = "classic"  # passkey template, one of text.PASSKEY_TEMPLATES
    haystack: str = "prose"  # niah haystack: prose, noise or a text file
    needle: str | None = None  # niah needle sentence, question and answer (None: the generator's own)
    question: str | None = None
    answer: str | None = None
    qa_file: str | None = None  # SQuAD/HotpotQA JSON for the qa task


@dataclass(frozen=True)
class TaskSpec:
    """One row of `TASKS`."""

    command: str  # the `python -m evals` command that runs it
    build: Callable[[TaskSettings], SampleFn]  # reads (and checks) the settings it uses, before any model loads
    metric: str = "all"
    uses_depth: bool = False
    needs: str | None = None  # a TaskSettings field left None drops the task from its command's default list


def _passkey(s: TaskSettings) -> SampleFn:
    if s.template not in PASSKEY_TEMPLATES:
        raise EvalInputError(f"passkey template {s.template!r} is unknown: use one of {', '.join(PASSKEY_TEMPLATES)}.")
    load_haystack(s.filler)  # an unreadable filler file fails here
    return lambda tok, n, d, rng, fmt: passkey_sample(tok, n, d, rng, s.filler, fmt, template=s.template)


def _niah(s: TaskSettings) -> SampleFn:
    load_haystack(s.haystack)
    kw = {k: v for k, v in dict(needle=s.needle, question=s.question, answer=s.answer).items() if v is not None}
    return lambda tok, n, d, rng, fmt: niah_sample(tok, n, d, rng, haystack=s.haystack, fmt=fmt, **kw)


def _ruler(name: str) -> Callable[[TaskSettings], SampleFn]:
    # RULER tasks place their own needles: depth is drawn per sample, not a grid axis.
    return lambda s: lambda tok, n, d, rng, fmt: ruler_sample(name, tok, n, rng, fmt)


def _qa(s: TaskSettings) -> SampleFn:
    if not s.qa_file:
        raise EvalInputError("the qa task needs --qa-file with a SQuAD or HotpotQA JSON file.")
    load_qa(os.path.abspath(s.qa_file))
    return lambda tok, n, d, rng, fmt: qa_sample(tok, n, rng, s.qa_file, fmt)


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec("passkey", _passkey, uses_depth=True),
    "niah": TaskSpec("niah", _niah, uses_depth=True),
    **{name: TaskSpec("ruler", _ruler(name)) for name in RULER_TASKS},
    "qa": TaskSpec("ruler", _qa, metric="part", needs="qa_file"),
}
COMMANDS = tuple(dict.fromkeys(spec.command for spec in TASKS.values()))  # passkey, niah, ruler


def make_task(name: str, settings: TaskSettings | None = None) -> Task:
    """The `Task` registered as ``name``, built with ``settings`` (defaults: `TaskSettings()`)."""
    if name not in TASKS:
        raise EvalInputError(f"unknown eval task {name!r}: use one of {', '.join(TASKS)}.")
    spec = TASKS[name]
    return Task(name, spec.build(settings or TaskSettings()), spec.metric, spec.uses_depth)


def command_tasks(command: str, settings: TaskSettings, names: Sequence[str] | None = None) -> list[Task]:
    """The tasks command ``command`` runs: ``names`` (each one of its own), or by default all of its
    tasks whose `TaskSpec.needs` setting is given."""
    own = [n for n, spec in TASKS.items() if spec.command == command]
    if names is None:
        names = [n for n in own if TASKS[n].needs is None or getattr(settings, TASKS[n].needs) is not None]
    for name in names:
        if name not in own:
            raise EvalInputError(f"unknown {command.upper()} task {name!r}: use one of {', '.join(own)}.")
    return [make_task(name, settings) for name in names]


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
