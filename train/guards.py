"""Run guards: stop on a non-finite loss or gradient with a message naming the step and the way back.

The train step already refuses to apply a non-finite update (the state stays the last good one,
``metrics["finite"]`` is False); `check_finite` turns that flag into a `NonFiniteError` on the host.
Reading the flag synchronises with the device, so call it every step only if that is affordable —
the state is safe either way, and checking every few steps still names the first bad step
when the metrics are kept per step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/inf; the message names the step and the last good checkpoint."""


def _scalar(x: Any) -> float:
    return float(np.asarray(x))


def check_finite(
    metrics: dict[str, Any],
    step: int,
    last_good_step: int | None = None,
    checkpoint_dir: str | None = None,
) -> None:
    """Raise `NonFiniteError` when ``metrics`` (from a train step) show a non-finite loss or gradient.

    Args:
        metrics: a step's metrics; reads ``finite`` if present, else ``loss`` and ``grad_norm``.
        step: the step that produced them (as the user counts it, e.g. the global step).
        last_good_step: the newest committed checkpoint step, or ``None`` if none was saved yet.
        checkpoint_dir: where that checkpoint lives (named in the message).
    """
    loss = _scalar(metrics.get("loss", 0.0))
    grad_norm = _scalar(metrics.get("grad_norm", 0.0))
    finite = bool(np.asarray(metrics["finite"])) if "finite" in metrics else math.isfinite(loss + grad_norm)
    if finite and math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient"
    if last_good_step is None:
        where = "no checkpoint has been saved yet, so restart from the beginning"
    else:
        place = f" in {checkpoint_dir}" if checkpoint_dir else ""
        where = f"the last good checkpoint is step {last_good_step}{place}; resume from it"
    raise NonFiniteError(
        f"{what} is not finite at step {step} (loss={loss}, grad_norm={grad_norm}); {where} "
        "with a lower learning rate, more warmup or tighter clipping, or check the data around this step."
    )
