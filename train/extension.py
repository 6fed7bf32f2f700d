"""The context-extension comparison of a run: stage 1, the extended stage, its control and other branches.

`extension` reads the per-stage passkey results (and learning curves) of ``report.json`` and
returns its ``extension`` object; `extension_table` prints it; `plot_extension_figure` draws
``extension.png``: accuracy against context length per stage and, when the stages recorded
learning curves (``eval.curve_every``), accuracy at the target length and twice it against steps.
"""

from __future__ import annotations

import os

from evals.report import plot_extension
from train.config import StagePlan, start_plan

# Passkey accuracy that counts as "retrieves" at a length.
RETRIEVAL_TARGET = 0.9


def extension(stages: dict, plans: list[StagePlan]) -> dict | None:
    """Stage 1 against the final stage and its sibling branches, at the training and the target length.

    The last stage is the extended model (its ``seq_len``, or its PoSE target, is ``target_length``);
    "stage 1" is the stage it starts from (trained at ``train_length``). A *control* is another stage branched
    from the same stage as the last one, at the same length, with θ unchanged from that stage (so it
    differs from the extension only in θ); other siblings (e.g. a PoSE branch) are listed under
    ``branches``. Accuracies are the teacher-forced passkey scores of the per-stage tables (None where
    a length was not scored); None when the first or the last stage has no passkey results.
    """
    final = plans[-1]
    base = src = start_plan(plans, final)
    if base is None or any("passkey" not in stages.get(p.name, {}) for p in (base, final)):
        return None
    target = _target_length(final)
    train_len = base.stage.seq_len

    def acc(p: StagePlan | None, n: int):
        return None if p is None else stages[p.name]["passkey"]["accuracy"].get(str(n))

    siblings = [p for p in plans[1:-1] if start_plan(plans, p) is src and "passkey" in stages.get(p.name, {})]
    control = next(
        (p for p in siblings if _target_length(p) == target and p.model.rope.theta == src.model.rope.theta
         and p.stage.seq_len == final.stage.seq_len),
        None,
    )  # fmt: skip

    def model(p: StagePlan) -> dict:
        s = stages[p.name]
        return {"stage": p.name, "seq_len": p.stage.seq_len, "target_length": _target_length(p),
                "theta": p.model.rope.theta, "steps": p.stage.steps, "from": s.get("from"),
                "pose": getattr(p.stage, "pose", None) is not None,
                "accuracy": s["passkey"]["accuracy"], "perplexity": s.get("perplexity", {}),
                "step_seconds": s.get("step_seconds"), "train_seconds": s.get("train_seconds"),
                "curve": s.get("curve")}  # fmt: skip

    return {
        "train_length": train_len,
        "target_length": target,
        "stage1_at_train": acc(base, train_len),
        "stage1_at_target": acc(base, target),
        "extended_at_target": acc(final, target),
        "extended_at_2x_target": acc(final, 2 * target),
        "control_at_target": acc(control, target),
        "control_at_2x_target": acc(control, 2 * target),
        "extended_minus_control_at_target": _diff(acc(final, target), acc(control, target)),
        "extended_minus_control_at_2x_target": _diff(acc(final, 2 * target), acc(control, 2 * target)),
        "extended_steps_to_target": steps_to(stages[final.name].get("curve"), target, RETRIEVAL_TARGET),
        "control_steps_to_target": steps_to(stages[control.name].get("curve"), target, RETRIEVAL_TARGET)
        if control
        else None,
        "stage1_perplexity_at_train": stages[base.name].get("perplexity", {}).get(str(train_len)),
        "stage1_perplexity_at_target": stages[base.name].get("perplexity", {}).get(str(target)),
        "stage1": model(base),
        "extended": model(final),
        "control": model(control) if control else None,
        "branches": [model(p) for p in siblings if p is not control],
    }


def curve_lengths(ev, plan: StagePlan) -> tuple[int, ...]:
    """The learning-curve lengths of a stage: ``eval.curve_lengths``, or its target length and twice it."""
    if ev.curve_lengths:
        return tuple(ev.curve_lengths)
    target = _target_length(plan)
    return (target, 2 * target)


def steps_to(curve: list[dict] | None, length: int, level: float = RETRIEVAL_TARGET) -> int | None:
    """The first learning-curve step whose passkey accuracy at ``length`` reaches ``level`` (None: never)."""
    for point in curve or []:
        acc = point["accuracy"].get(str(length))
        if acc is not None and acc >= level:
            return int(point["step"])
    return None


def _target_length(plan: StagePlan) -> int:
    pose = getattr(plan.stage, "pose", None)
    return int(pose.target_length) if pose else plan.stage.seq_len


def extension_table(ext: dict) -> str:
    """The closing table: one row per model (stage 1, extended, control, other branches)."""
    L, T = ext["train_length"], ext["target_length"]
    cols = [L, T, 2 * T]
    head = f"{'model':<34}{'θ':>11}" + "".join(f"{'@' + str(n):>8}" for n in cols) + f"{'s/step':>8}"
    lines = [f"context extension: trained at {L}, target {T}", head, "-" * len(head)]
    rows = [("stage 1", ext["stage1"]), ("extended (θ scaled)", ext["extended"]), ("control (θ unchanged)",
            ext["control"])] + [("PoSE branch" if b["pose"] else "branch", b) for b in ext["branches"]]  # fmt: skip
    for label, m in rows:
        if m is None:
            continue
        accs = "".join(f"{_pct(m['accuracy'].get(str(n))):>8}" for n in cols)
        cost = f"{m['step_seconds']:.2f}" if m.get("step_seconds") else "n/a"
        lines.append(f"{label + ': ' + m['stage']:<34}{m['theta']:>11.4g}{accs}{cost:>8}")
    p_l, p_t = ext.get("stage1_perplexity_at_train"), ext.get("stage1_perplexity_at_target")
    if p_l is not None and p_t is not None:
        lines.append(f"stage 1 held-out perplexity: {p_l:.3f} at {L}, {p_t:.3f} at {T}")
    a_t, a_x = ext["stage1_at_target"], ext["extended_at_target"]
    if a_t is not None and a_x is not None:
        met = a_x >= RETRIEVAL_TARGET and a_t < RETRIEVAL_TARGET
        lines.append(f"passkey at {T}: stage 1 {a_t:.0%} → extended {a_x:.0%} (target: ≥ {RETRIEVAL_TARGET:.0%} "
                     f"after extension where stage 1 is below it: {'met' if met else 'NOT met'})")  # fmt: skip
    if ext.get("control") is not None:
        d_t, d_x = ext.get("extended_minus_control_at_target"), ext.get("extended_minus_control_at_2x_target")
        lines.append(f"θ-scaled − control: {_points(d_t)} at {T}, {_points(d_x)} at {2 * T}")
    if ext.get("extended", {}).get("curve"):
        lines.append(f"steps to {RETRIEVAL_TARGET:.0%} at {T}: θ-scaled {_steps(ext.get('extended_steps_to_target'))}, "
                     f"control {_steps(ext.get('control_steps_to_target'))}")  # fmt: skip
    return "\n".join(lines)


def _points(d) -> str:
    return "n/a" if d is None else f"{100 * d:+.0f} points"


def _steps(n) -> str:
    return "not reached" if n is None else str(n)


def _diff(a, b):
    return None if a is None or b is None else a - b


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def plot_extension_figure(run_dir: str, stages: dict, plans: list[StagePlan]) -> str | None:
    """``<run_dir>/extension.png``: passkey accuracy vs length per stage, and the stages' learning curves."""
    series, curves = {}, {}
    for p in plans:
        s = stages.get(p.name, {})
        if "passkey" not in s:
            continue
        label = f"{p.name} (θ {p.model.rope.theta:.3g}"
        label += f", PoSE positions to {_target_length(p)})" if getattr(p.stage, "pose", None) else ")"
        series[label] = {"accuracy": s["passkey"]["accuracy"], "trained_length": p.stage.seq_len}
        if s.get("curve"):
            # Step 0 is the model the stage starts from, scored on the same lengths by its own stage.
            src = start_plan(plans, p)
            start = stages.get(src.name, {}).get("passkey", {}).get("accuracy", {}) if src else {}
            first = {n: start[n] for n in s["curve"][0]["accuracy"] if n in start}
            points = ([{"step": 0, "accuracy": first}] if first else []) + s["curve"]
            curves[label] = points
    try:
        plot_extension(os.path.join(run_dir, "extension.png"), series, curves=curves)
    except ImportError:  # matplotlib is optional
        return None
    return "extension.png"
