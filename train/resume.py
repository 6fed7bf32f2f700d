"""What ``--resume`` checks first: the config must still describe what the checkpoint was training.

Every checkpoint stores a fingerprint of its run (`fingerprint`, under `FINGERPRINT_KEY`): the
``model`` section as resolved, LoRA, the seed, and each stage up to the one it was written in,
resolved (name, length, steps, batch, θ, max positions, PoSE, branch source, optimizer, data mix).
`check_resume` compares it with the config being resumed and refuses — `CheckpointError`, exit 2,
before anything is written — at the first difference, naming the field and both values. A resume
that silently continued would train something the config no longer says (the old model under a new
stage name, or the old width after the config doubled it).

Free to change: stages after the checkpoint's (added, removed, edited), meshes and the layout,
the model's execution fields (`RESUMABLE_MODEL_FIELDS`, applied on resume), ``data.cache_dir``,
and everything outside model, data, optim, stages, lora and seed (eval, export, checkpoint,
logging, progress, loss_chunk). Checkpoints written before the fingerprint existed get their
stage name checked and a warning.
"""

from __future__ import annotations

import json
import os
from typing import Any

from model import schema
from model.config import ConfigError, LlamaConfig
from train.checkpoint import Checkpointer, CheckpointError, step_meta
from train.config import StagePlan, TrainConfig, model_config, start_plan

FINGERPRINT_KEY = "resume_check"
# How the model is computed, not what it is: a resume may change these, and the change applies.
# (scan_layers is not here: it changes the parameter tree the checkpoint holds.)
RESUMABLE_MODEL_FIELDS = ("dtype", "remat_policy", "attention_impl", "attention_chunk", "attention_kernel",
                          "context_parallel", "ulysses_size")  # fmt: skip
# Where data is cached, not what it is.
RESUMABLE_DATA_FIELDS = ("cache_dir",)


def fingerprint(cfg: TrainConfig, plans: list[StagePlan], from_init: bool) -> dict[str, Any]:
    """What a checkpoint of this run records (all stages; a save keeps those up to its own).

    Args:
        cfg: the run config.
        plans: its resolved stages.
        from_init: the run's first stage started from ``--init-from`` weights (then only the
            execution fields the config sets explicitly override the checkpoint's model on resume).
    """
    model = model_config(cfg).to_dict()
    for name in RESUMABLE_MODEL_FIELDS:
        model.pop(name, None)
    out = {
        "from_init": bool(from_init),
        "seed": cfg.seed,
        "model": model,
        "lora": schema.to_dict(cfg.lora) if cfg.lora is not None else None,
        "stages": [_stage_record(p) for p in plans],
    }
    return json.loads(json.dumps(out))  # the JSON view a checkpoint stores (tuples → lists)


def _stage_record(plan: StagePlan) -> dict[str, Any]:
    s = plan.stage
    data = schema.to_dict(plan.data)
    for name in RESUMABLE_DATA_FIELDS:
        data.pop(name, None)
    return {
        "name": plan.name,
        "seq_len": s.seq_len,
        "pose": schema.to_dict(s.pose) if s.pose is not None else None,  # before θ: PoSE moves a θ rule
        "steps": s.steps,
        "batch_size": s.batch_size,
        "theta": plan.model.rope.theta,  # resolved: a rule and the θ it gives are the same stage
        "max_position_embeddings": plan.model.max_position_embeddings,
        "from": s.from_stage,
        "carry_optimizer_state": s.carry_optimizer_state,
        "optim": schema.to_dict(plan.optim),
        "data": data,
    }


def latest_checkpoint(ckpt_dir: str) -> tuple[dict[str, Any], list[int]]:
    """The newest checkpoint's metadata and every committed step in ``ckpt_dir``."""
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--resume found no checkpoints in {ckpt_dir}: start the run without --resume first.")
    with Checkpointer(ckpt_dir, read_only=True) as probe:
        if probe.latest_step() is None:
            raise ConfigError(f"--resume found no committed checkpoint in {ckpt_dir}: start without --resume.")
        return probe.read_meta(), probe.all_steps()


def resumed_base(meta: dict[str, Any], cfg: TrainConfig) -> LlamaConfig:
    """The first stage's model of a resumed run: the checkpoint's, with the config's execution fields."""
    base = LlamaConfig.from_dict(meta["base_model"])
    # Unknown (an older checkpoint) counts as --init-from: then only fields the config sets apply.
    explicit_only = (meta.get(FINGERPRINT_KEY) or {}).get("from_init", True)
    ours = model_config(cfg)
    return base.replace(**{k: getattr(ours, k) for k in RESUMABLE_MODEL_FIELDS if k in cfg.model or not explicit_only})


def checkpoint_model(path: str) -> LlamaConfig:
    """The model of a training checkpoint step (``--init-from runs/x/checkpoints/6``): its stage's θ and positions."""
    meta = step_meta(path)
    if (meta.get(FINGERPRINT_KEY) or {}).get("lora") is not None:
        raise ConfigError(
            f"--init-from {path} is a LoRA run's checkpoint, which holds adapters only: export the merged model "
            "with python -m convert flax-to-hf --merge-lora from that run's lora/ and start from the export."
        )
    return LlamaConfig.from_dict(meta["model"])


def stage_end_step(plans: list[StagePlan], plan: StagePlan) -> int:
    """The global step at which ``plan`` ends (its stage-end checkpoint)."""
    return sum(p.stage.steps for p in plans[: plan.index + 1])


def protected_steps(plans: list[StagePlan]) -> set[int]:
    """Stage-end steps that later stages branch from: keep-N must never delete them."""
    return {stage_end_step(plans, start_plan(plans, p)) for p in plans if p.stage.from_stage is not None}


def check_resume(
    meta: dict[str, Any], steps: list[int], cfg: TrainConfig, plans: list[StagePlan], ckpt_dir: str, say=print
) -> None:
    """Refuse (`CheckpointError`) a resume whose config no longer describes what the checkpoint trained.

    Args:
        meta: the newest checkpoint's metadata.
        steps: the committed checkpoint steps (later branches need their sources' stage ends).
        cfg: the config being resumed.
        plans: its resolved stages.
        ckpt_dir: the checkpoint directory (named in the fix).
        say: where the warning for an older checkpoint goes.
    """
    index, name, step = meta["stage"], meta["stage_name"], meta["global_step"]
    stored = meta.get(FINGERPRINT_KEY)
    if stored is not None and stored.get("lora") is None:
        fix = (
            "revert the edit, start a fresh run in another --run-dir, or start a new curriculum from these "
            f"weights with --init-from {os.path.join(ckpt_dir, str(step))}"
        )
    else:  # a LoRA checkpoint holds adapters only, and --init-from already names its base
        fix = "revert the edit, or start a fresh run in another --run-dir"
    if index >= len(plans):
        raise CheckpointError(
            f"--resume: the checkpoint (global step {step}) is in stages.{index} ({name!r}) but the config lists "
            f"only {len(plans)} stage(s); {fix}."
        )
    if plans[index].name != name:
        raise CheckpointError(
            f"--resume: the name of stages.{index} is {name!r} in the checkpoint (global step {step}) but "
            f"{plans[index].name!r} in the config; {fix}."
        )
    if stored is None:
        say(
            f"warning: the checkpoint at global step {step} predates resume checks, so only its stage name was "
            f"checked: the model, LoRA, seed and stages up to {name!r} must be as they were when it was written."
        )
    else:
        now = fingerprint(cfg, plans, stored["from_init"])
        diffs = [_first_diff(stored[k], now[k], k) for k in ("seed", "model", "lora")]
        for i, (old, new) in enumerate(zip(stored["stages"], now["stages"][: index + 1], strict=True)):
            found = _first_diff(old, new, "")
            diffs.append(found and (f"{found[0]} of stage {old['name']!r} (stages.{i}, resolved)", *found[1:]))
        diff = next((d for d in diffs if d), None)
        if diff:
            field, was, now_value = diff
            raise CheckpointError(
                f"--resume: {field} is {_show(was)} in the checkpoint (global step {step}) but {_show(now_value)} "
                f"in the config; {fix}."
            )
    _check_branch_sources(plans, index, steps, ckpt_dir)


def _check_branch_sources(plans: list[StagePlan], index: int, steps: list[int], ckpt_dir: str) -> None:
    """A later stage branching from one finished before the checkpoint needs that stage's end checkpoint."""
    for plan in plans[index + 1 :]:
        src = start_plan(plans, plan)
        if plan.stage.from_stage is None or src.index >= index:  # this run trains (and keeps) src's end
            continue
        end = stage_end_step(plans, src)
        if end not in steps:
            raise CheckpointError(
                f"--resume: stage {plan.name!r} branches from {src.name!r}, whose stage-end checkpoint (global "
                f"step {end}) is not in {ckpt_dir}; branch from a stage that is still there, or train this "
                "curriculum in a fresh --run-dir."
            )


def _first_diff(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    """The first (dotted path, old, new) where two JSON values differ; None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _first_diff(a, b, f"{path}.{i}")
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:119] + "…"


__all__ = [
    "FINGERPRINT_KEY",
    "RESUMABLE_MODEL_FIELDS",
    "check_resume",
    "checkpoint_model",
    "fingerprint",
    "latest_checkpoint",
    "protected_steps",
    "resumed_base",
    "stage_end_step",
]
