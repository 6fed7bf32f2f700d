"""The curriculum runner: stages in order, θ and length changing between them, params carried over.

    result = run(load_config("configs/demo.yaml"), run_dir="runs/demo")

Per stage: the model config gets the stage's θ and max positions (`train.config.validate`),
`train.stage.build_stage` builds its mesh, optimizer, shardings, steps and data iterator once,
params (and, if ``carry_optimizer_state``, Adam's moments) move over from the previous stage —
resharded when the mesh changes — and the learning-rate schedule restarts (``state.step`` counts
steps within the stage). Every ``checkpoint.every`` global steps and at each stage end an orbax
checkpoint stores the state plus what exact resumption needs: stage, steps, data-iterator position, RNG and the configs.
Each stage ends with held-out perplexity at its own length and the next stage's, and the
passkey grid when configured (`train.stage_eval`).

Branches: a stage with ``from: NAME`` starts from the final state of the earlier stage NAME
(bitwise: a host copy taken when NAME ended, or its stage-end checkpoint after ``--resume``)
instead of the stage before it; its θ rule and max positions continue from NAME too, and its
data stream is seeded by its depth in the tree (`train.stage.stage_depth`), so sibling branches — say, a
θ-scaled stage 2 and a control with θ unchanged — read the same documents in the same order.

The final model — the last stage listed — is saved as a ringllama checkpoint
(``<run_dir>/final``) whose config carries its θ and max positions, and optionally exported to
Hugging Face format (``<run_dir>/hf``).

Exactness of ``--resume``: the train step is deterministic, the data iterator restores its
position, and the state restored from a checkpoint is bit-identical, so the losses after a
resume equal those of an uninterrupted run. A resume first checks that the config still describes
what the checkpoint trained (`train.resume`), and keep-N spares the stage ends that branches need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from convert.checkpoint import is_hf_checkpoint, is_ringllama_checkpoint, read_config
from convert.names import ConversionError
from convert.peft import save_lora_checkpoint, save_peft
from model.config import ConfigError, LlamaConfig
from train import metrics as M
from train.checkpoint import Checkpointer, is_training_checkpoint
from train.config import StagePlan, TrainConfig, dump_config, model_config, start_plan, validate
from train.flops import train_step_flops
from train.guards import check_finite
from train.report import Reporter, RunResult
from train.resume import (
    FINGERPRINT_KEY,
    check_resume,
    checkpoint_model,
    fingerprint,
    latest_checkpoint,
    protected_steps,
    resumed_base,
    stage_end_step,
)
from train.runtime import check_memory, init_from_model
from train.stage import Engine, StageRun, build_stage, move_state
from train.state import TrainState, full_params

# Model-config fields that describe how to run, not what the model is: a config's values for
# these apply on top of an --init-from checkpoint's own config.
EXEC_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "attention_chunk", "attention_kernel",
               "context_parallel", "ulysses_size")  # fmt: skip


def base_model(cfg: TrainConfig, init_from: str | None) -> LlamaConfig:
    """The model the first stage starts from: the config's, or an --init-from checkpoint's with exec fields."""
    if init_from is None:
        return model_config(cfg)
    if is_ringllama_checkpoint(init_from):
        loaded = read_config(init_from)
    elif is_training_checkpoint(init_from):
        loaded = checkpoint_model(init_from)
    elif is_hf_checkpoint(init_from):
        loaded = LlamaConfig.from_hf(init_from)
    else:
        raise ConfigError(
            f"--init-from {init_from} is neither a ringllama checkpoint (config + params/), a Hugging Face "
            "directory (config.json + safetensors) nor a step of a run's checkpoints/: point at one of them."
        )
    ours = model_config(cfg)
    return loaded.replace(**{k: getattr(ours, k) for k in EXEC_FIELDS if k in cfg.model})


@dataclasses.dataclass(frozen=True)
class _RunContext:
    """What every stage of one run shares: where it writes, what it resumes from, how it reports."""

    cfg: TrainConfig
    plans: list[StagePlan]
    ckptr: Checkpointer
    logger: M.MetricsLogger
    base: LlamaConfig  # the first stage's model (checkpoint metadata: what a resume validates against)
    fingerprint: dict  # what a resume checks the config against (`train.resume`); a save keeps its stages
    rng: np.ndarray  # the run's key data: the init key and a LoRA run's random base derive from it
    peak: float | None  # device peak TFLOP/s for the MFU column
    init_from: str | None
    lora_base: str | None  # a LoRA run's frozen base: its --init-from (None: the seed's random base)
    stop_after: int | None
    lead: bool
    say: Any
    reporter: Reporter  # end-of-stage evals and learning-curve points


def run(
    cfg: TrainConfig,
    *,
    run_dir: str | None = None,
    resume: bool = False,
    init_from: str | None = None,
    stop_after: int | None = None,
    say=print,
) -> RunResult:
    """Run (or resume) the curriculum; see the module docstring.

    Args:
        cfg: the run config.
        run_dir: overrides ``cfg.run_dir``.
        resume: continue from the newest checkpoint in ``<run_dir>/checkpoints``.
        init_from: start the first stage from these weights (ringllama checkpoint or HF directory).
        stop_after: stop after this many global steps, with a checkpoint (a planned interruption).
        say: where progress lines go (process 0 only).
    """
    if run_dir:
        cfg = dataclasses.replace(cfg, run_dir=run_dir)
    run_dir = cfg.run_dir
    lead = jax.process_index() == 0
    say = say if lead else (lambda *a, **k: None)
    ckpt_dir = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if resume and init_from and cfg.lora is None:
        raise ConfigError(
            "--resume and --init-from are exclusive: a resumed run takes its weights from its checkpoint "
            "(only a LoRA run takes --init-from on --resume, for its frozen base)."
        )

    meta: dict[str, Any] | None = None
    lora_base = os.path.abspath(init_from) if cfg.lora is not None and init_from else None
    if resume:
        meta, steps = latest_checkpoint(ckpt_dir)
        base = resumed_base(meta, cfg)
        if cfg.lora is not None and "lora_base" in meta:
            _check_lora_base(meta["lora_base"], lora_base)
    else:
        base = base_model(cfg, init_from)
    plans = validate(cfg, jax.device_count(), jax.process_count(), base)
    if meta is not None:  # before anything is written: a refused resume leaves the run dir as it was
        check_resume(meta, steps, cfg, plans, ckpt_dir, say)
    from_init = (meta.get(FINGERPRINT_KEY) or {}).get("from_init", True) if meta else init_from is not None
    check_memory(cfg, plans, say)  # before anything compiles

    if lead:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
            fh.write(dump_config(cfg))
        if not resume:  # a fresh run must not resume, keep-N or report against an older one in the same place
            for stale in ("checkpoints", "final", "hf", "lora", "peft", "passkey", "report.json", "loss.png"):
                path = os.path.join(run_dir, stale)
                shutil.rmtree(path) if os.path.isdir(path) else (os.remove(path) if os.path.exists(path) else None)
    _barrier("run_dir")
    ckptr = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                         protect=protected_steps(plans))  # fmt: skip
    logger = M.MetricsLogger(
        run_dir, resume_step=meta["global_step"] if meta else None, tensorboard=cfg.tensorboard, enabled=lead
    )
    reporter = Reporter(cfg, plans, run_dir, say, lead, resume=resume)

    start_stage = meta["stage"] if meta else 0
    stage_step = meta["stage_step"] if meta else 0
    global_step = meta["global_step"] if meta else 0
    rng = np.asarray(meta["rng"], np.uint32) if meta else np.asarray(jax.random.key_data(jax.random.key(cfg.seed)))
    peak, peak_src = (cfg.peak_tflops, "peak_tflops from the config") if cfg.peak_tflops else M.device_peak_tflops()
    say(f"devices: {jax.device_count()} × {jax.devices()[0].device_kind} ({peak_src}); run dir {run_dir}")
    if meta:
        say(f"resuming from the checkpoint at global step {global_step} ({plans[start_stage].name}, step {stage_step})")

    fp = fingerprint(cfg, plans, from_init)
    ctx = _RunContext(
        cfg, plans, ckptr, logger, base, fp, rng, peak, init_from, lora_base, stop_after, lead, say, reporter
    )
    state, prev_plan, last_saved = None, None, (global_step if meta else None)
    branch_points = {p.stage.from_stage for p in plans if p.stage.from_stage is not None}
    ends: dict[str, Any] = {}  # host copies of the stage-end states that later stages branch from
    try:
        for plan in plans[start_stage:]:
            training = stage_step < plan.stage.steps
            stage = build_stage(cfg, plans, plan, with_data=training)
            eng = stage.engine
            say(_stage_banner(plan))
            start = start_plan(plans, plan)
            if state is None and meta is not None:
                state = _restore(ctx, global_step, eng)
            elif state is None and start is None:
                key = jax.random.wrap_key_data(jnp.asarray(rng))
                params = init_from_model(init_from, eng, say) if init_from else None
                state = eng.init(jax.random.fold_in(key, 0), params=params)
                del params  # a LoRA state holds its own (cast) frozen copy: free the loaded one
            elif start is not prev_plan:
                say(f"{plan.name}: starts from the end of {start.name} (a branch)")
                state = move_state(_branch_source(ctx, ends, start), stage, say)
            else:
                state = move_state(state, stage, say)
            if training:
                if meta is not None and stage_step > 0:
                    stage.data.restore(meta["data_state"])
                state, global_step, stage_step, last_saved = _train_stage(
                    ctx, stage, state, global_step, stage_step, last_saved
                )
            more = stage_step < plan.stage.steps or plan.index + 1 < len(plans)
            if stage_step < plan.stage.steps or (stop_after is not None and global_step >= stop_after and more):
                ckptr.wait()
                say(f"stopped after global step {global_step} as asked (--stop-after); continue with --resume.")
                return reporter.finish(_merged_view(state, eng), plan, stage.mesh, global_step, stopped=True)
            if not reporter.has_stage(plan.name):
                nxt = plans[plan.index + 1] if plan.index + 1 < len(plans) else None
                for record in reporter.end_of_stage(_merged_view(state, eng), stage, nxt, global_step):
                    logger.log(record)
            # A host copy (the next stage's train step donates these buffers); a multi-process state
            # cannot be fetched to one host, so there the branch restores its stage-end checkpoint.
            if plan.name in branch_points and jax.process_count() == 1:
                ends[plan.name] = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(state))
            prev_plan, stage_step, meta = plan, 0, None
        ckptr.wait()
        final = plans[-1]  # the last stage built above
        result = reporter.finish(_merged_view(state, stage.engine), final, stage.mesh, global_step, stopped=False)
        if cfg.lora is not None and lead and jax.process_count() > 1:
            say("multi-process run: the adapters are the last checkpoint in checkpoints/ (no lora/ or peft/ export)")
        elif cfg.lora is not None and lead:
            _save_lora(run_dir, final, cfg.lora, state, init_from, say)
    finally:
        ckptr.close()
        logger.close()
    if lead:
        M.plot_run(logger.path, os.path.join(run_dir, "loss.png"))
    return result


def _train_stage(ctx: _RunContext, stage: StageRun, state: TrainState, global_step: int, stage_step: int, last_saved):
    """Train ``stage`` from ``stage_step`` to its end (or to ``--stop-after``); returns the loop counters."""
    cfg, plan, it = ctx.cfg, stage.plan, stage.data
    steps, seq_len, batch_size = plan.stage.steps, plan.stage.seq_len, plan.stage.batch_size
    flops = train_step_flops(plan.model, seq_len, batch_size)
    tokens = batch_size * seq_len
    bar = _progress(cfg.progress and ctx.lead, steps, stage_step, plan.name, ctx.say)
    timer, first = M.StepTimer(), True
    batch = next(it)
    data_state = it.state()  # the position after `batch`: where a resume after this step continues
    while stage_step < steps:
        state, metrics = stage.engine.train_step(state, batch)
        stage_step += 1
        global_step += 1
        done_state = data_state
        if stage_step < steps:  # prepare the next batch while the device works
            batch = next(it)
            data_state = it.state()
        metrics = jax.device_get(metrics)
        dt = timer.tick()
        check_finite(metrics, global_step, last_saved, ctx.ckptr.directory)
        record = {
            "kind": "train",
            "stage": plan.name,
            "stage_index": plan.index,
            "step": global_step,
            "stage_step": stage_step,
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "tokens_per_sec": tokens / dt,
            "mfu": M.mfu(flops, dt, jax.device_count(), ctx.peak),
            "step_time": dt,
            "seq_len": seq_len,
            "theta": plan.model.rope.theta,
            "includes_compile": first,
        }
        first = False
        ctx.logger.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_sec']:.0f}")
        every = cfg.checkpoint.every
        stopping = ctx.stop_after is not None and global_step >= ctx.stop_after
        if stage_step == steps or stopping or (every and global_step % every == 0):
            _save(ctx, plan, state, global_step, stage_step, done_state)
            last_saved = global_step
        if ctx.reporter.wants_curve_point(plan, stage_step):
            ctx.reporter.curve_point(_merged_view(state, stage.engine), stage, stage_step)
        if stopping:
            break
    if bar is not None:
        bar.close()
    return state, global_step, stage_step, last_saved


def _restore(ctx: _RunContext, step: int, eng: Engine) -> TrainState:
    """The state of checkpoint ``step`` on ``eng``'s mesh; a LoRA run re-attaches its frozen base."""
    state, _ = ctx.ckptr.restore(step, eng.restore_target)
    if eng.lora is not None:  # LoRA checkpoints hold no base
        state = state.replace(frozen=_lora_base(ctx, eng))
    return state


def _branch_source(ctx: _RunContext, ends: dict[str, Any], src: StagePlan) -> TrainState:
    """The end state of stage ``src``: kept from this run, or (after --resume) its stage-end checkpoint."""
    if src.name in ends:
        return ends[src.name]
    end_step = stage_end_step(ctx.plans, src)
    ctx.ckptr.wait()  # the stage-end save may still be in flight
    if end_step not in ctx.ckptr.all_steps():
        raise ConfigError(
            f"stage {src.name!r} is the start of a later branch but its stage-end checkpoint (global step "
            f"{end_step}) is gone: raise checkpoint.keep so that it survives, or rerun without --resume."
        )
    # Restored as ``src`` was trained: its mesh, its optimizer's state tree and, with LoRA, its layout.
    return _restore(ctx, end_step, build_stage(ctx.cfg, ctx.plans, src, with_data=False).engine)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _save(ctx: _RunContext, plan: StagePlan, state, global_step: int, stage_step: int, data_state) -> None:
    meta = {
        "global_step": int(global_step),
        "stage": plan.index,
        "stage_name": plan.name,
        "stage_step": int(stage_step),
        "data_state": data_state,
        "rng": np.asarray(ctx.rng).tolist(),
        "base_model": ctx.base.to_dict(),
        "model": plan.model.to_dict(),  # the config this state trains: its stage's θ and max positions
        "lora_base": ctx.lora_base,  # a LoRA run's frozen base: its --init-from (None: the seed's random base)
        FINGERPRINT_KEY: {**ctx.fingerprint, "stages": ctx.fingerprint["stages"][: plan.index + 1]},
    }
    json.dumps(meta)  # fail here, not in orbax's background thread, if something is not JSON
    ctx.ckptr.save(global_step, state, meta)


def _check_lora_base(saved: str | None, given: str | None) -> None:
    """A resumed LoRA run must re-attach the frozen base its adapters were trained on."""
    if saved == given:
        return
    if saved is None:
        raise ConfigError(f"this LoRA run adapts the seed's random base, not {given}: resume it without --init-from.")
    raise ConfigError(f"this LoRA run adapts {saved}: resume it with --init-from {saved}.")


def _lora_base(ctx: _RunContext, eng: Engine):
    """The frozen base of a restored LoRA state: ``--init-from`` again, or the seed's random base (as at the start)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(ctx.rng)), 0)  # the key the init was given
    base = init_from_model(ctx.init_from, eng, ctx.say) if ctx.init_from else None
    return eng.frozen(base=base, key=key)


def _merged_view(state: TrainState, eng: Engine) -> TrainState:
    """What evaluation and export read: a LoRA state's merged base-model params (W + (α/r)·A·B)."""
    if eng.lora is None:
        return state
    return state.replace(params=eng.merged(state), frozen=None)


def _save_lora(run_dir: str, plan: StagePlan, lora, state, init_from: str | None, say) -> None:
    """``<run_dir>/lora`` (ringllama LoRA checkpoint) and ``<run_dir>/peft`` (PEFT adapter directory)."""
    params = jax.device_get(full_params(state))
    for stale in ("lora", "peft"):  # a resumed run that appended a stage writes them again
        shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
    save_lora_checkpoint(os.path.join(run_dir, "lora"), plan.model, lora, params, base_model_name_or_path=init_from)
    try:
        save_peft(os.path.join(run_dir, "peft"), plan.model, lora, params, init_from)
        say(f"LoRA adapters: {run_dir}/lora (ringllama) and {run_dir}/peft (PEFT)")
    except ConversionError as exc:
        say(f"LoRA adapters: {run_dir}/lora (ringllama); no PEFT directory: {exc}")


def _stage_banner(plan: StagePlan) -> str:
    s, m = plan.stage, plan.model
    mesh = ",".join(f"{a}={n}" for a, n in zip(("data", "fsdp", "tensor", "sequence"), plan.mesh_shape, strict=True))
    pose = f" (PoSE: positions span {s.pose.target_length}, {s.pose.chunks} chunks)" if s.pose else ""
    return (
        f"== {plan.name}: seq_len {s.seq_len}{pose}, θ {m.rope.theta:.4g}, max positions {m.max_position_embeddings}, "
        f"{s.steps} steps × batch {s.batch_size}, lr {plan.optim.lr:g}, mesh {mesh}, layout {plan.layout}"
    )


def _progress(enabled: bool, total: int, done: int, name: str, say=print):
    """A redrawing bar on a terminal; in a log (not a TTY), a line every ~10% of the stage or minute."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return M.LineProgress(total, done, name, say)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="step", dynamic_ncols=True)


__all__ = ["EXEC_FIELDS", "base_model", "run"]
