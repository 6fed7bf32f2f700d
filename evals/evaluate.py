"""Run an evaluation grid: generate each cell's samples, run the model, score, aggregate.

Records are flat dicts (one per sample) so they go straight to JSON and CSV; aggregates are
mean scores per (task, length, depth), per (task, length) and per task.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from evals.runner import Runner
from evals.scoring import METRICS, truncate_prediction
from evals.tasks import Cell, Task, cell_samples
from text.synthetic import PromptFormat


def evaluate(
    runner: Runner,
    tokenizer,
    tasks: Sequence[Task],
    cells: Sequence[Cell],
    *,
    samples: int,
    seed: int = 0,
    mode: str = "forced",
    fmt: PromptFormat | None = None,
    progress: bool = True,
) -> list[dict]:
    """Score every sample of every cell; ``mode`` is ``"forced"`` (teacher-forced) or ``"generate"`` (greedy)."""
    if mode not in ("forced", "generate"):
        raise ValueError(f"unknown mode {mode!r}: use forced or generate.")
    by_name = {t.name: t for t in tasks}
    records: list[dict] = []
    bar = _progress(cells, progress)
    for cell in bar:
        task = by_name[cell.task]
        batch = cell_samples(task, cell, tokenizer, samples, seed, fmt)
        if mode == "forced":
            results = runner.forced(batch)
            predictions = [tokenizer.decode(r.argmax_ids) for r in results]
            scores = [1.0 if r.correct else 0.0 for r in results]
            logprobs = [r.answer_logprob for r in results]
        else:
            max_new = -(-(max(len(s.answer_ids) for s in batch) + 8) // 8) * 8
            generated = runner.generate(batch, max_new)
            predictions = [truncate_prediction(tokenizer.decode(g)) for g in generated]
            scores = [METRICS[task.metric](p, s.references) for p, s in zip(predictions, batch, strict=True)]
            logprobs = [None] * len(batch)
        for i, (s, pred, score, lp) in enumerate(zip(batch, predictions, scores, logprobs, strict=True)):
            records.append(
                {
                    "task": cell.task,
                    "length": cell.length,
                    "depth_percent": None if cell.depth is None else round(cell.depth * 100, 2),
                    "sample": i,
                    "mode": mode,
                    "score": score,
                    "correct": score == 1.0,
                    "prediction": pred.strip(),
                    "answer": s.answer,
                    "references": list(s.references),
                    "answer_logprob": lp,
                    "prompt_tokens": len(s.prompt_ids),
                    "answer_tokens": len(s.answer_ids),
                    "needle_depths": s.metadata.get("needle_depths", []),
                }
            )
        if hasattr(bar, "set_postfix"):
            done = [r["score"] for r in records]
            bar.set_postfix(task=cell.task, length=cell.length, mean=f"{sum(done) / len(done):.3f}")
    return records


def _progress(cells, enabled: bool):
    if not enabled:
        return cells
    from tqdm.auto import tqdm

    return tqdm(cells, desc="eval grid", unit="cell")


def aggregate(records: Sequence[dict]) -> dict:
    """Mean score and count per (task, length, depth), per (task, length) and per task."""

    def group(keys):
        acc: dict[tuple, list[float]] = defaultdict(list)
        for r in records:
            acc[tuple(r[k] for k in keys)].append(r["score"])
        return [
            {**dict(zip(keys, k, strict=True)), "n": len(v), "score": sum(v) / len(v)}
            for k, v in sorted(acc.items(), key=_key)
        ]

    return {
        "by_cell": group(("task", "length", "depth_percent")),
        "by_length": group(("task", "length")),
        "by_task": group(("task",)),
    }


def _key(item):
    return tuple((x is None, x if x is not None else 0) for x in item[0])
