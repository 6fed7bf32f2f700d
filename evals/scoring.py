"""Scorers: RULER's case-insensitive substring matches and the teacher-forced all-argmax rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """Fraction of references found in the prediction (case-insensitive substring; RULER's niah/vt/cwe/fwe)."""
    if not references:
        raise ValueError("a sample needs at least one reference to score against.")
    pred = _norm(prediction)
    return sum(_norm(r) in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """1.0 if any reference is found in the prediction (case-insensitive; RULER's QA tasks), else 0.0."""
    if not references:
        raise ValueError("a sample needs at least one reference to score against.")
    pred = _norm(prediction)
    return float(any(_norm(r) in pred for r in references))


METRICS = {"all": string_match_all, "part": string_match_part}


def forced_correct(argmax_ids: Sequence[int], answer_ids: Sequence[int]) -> bool:
    """Teacher-forced rule: correct iff every answer token is the model's argmax at its position."""
    a, b = np.asarray(argmax_ids), np.asarray(answer_ids)
    return a.shape == b.shape and bool(np.all(a == b))


def truncate_prediction(text: str) -> str:
    """A generated answer up to its first blank line (what RULER scores); surrounding spaces removed."""
    return text.strip().split("\n\n")[0].strip()
