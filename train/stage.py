"""One stage's run objects, built once: mesh, optimizer, shardings, jitted steps and data iterator.

    stage = build_stage(cfg, plans, plan)          # the runner's one place that builds them
    state = stage.init(key)                        # or ckptr.restore(step, stage.restore_target)
    state, metrics = stage.train_step(state, next(stage.data))

`build_engine` is the part that needs no run config — the model, optimizer and mesh of one
stage — so tests and benchmarks get exactly the step, shardings and restore target the runner
uses. Everything downstream (the runner, stage moves, checkpoint restores, evals, exports)
takes these objects instead of rebuilding them from the config, so the optimizer that shapes
the state's moments is the same object that updates them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from model import lora as lora_lib
from model.config import LlamaConfig
from model.params import abstract_params
from sharding.cp_plan import resolve_context_parallel
from sharding.mesh import make_mesh
from sharding.rules import param_shardings
from train.config import StagePlan, TrainConfig, start_plan
from train.data import DataIterator, make_iterator
from train.optim import OptimConfig, make_optimizer, make_schedule
from train.state import (
    TrainState,
    abstract_state,
    frozen_params,
    init_opt_state,
    init_state,
    merged_params,
    state_shardings,
)
from train.step import CompiledStep, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Engine:
    """The compiled machinery of one (model, optimizer, mesh, schedule horizon).

    Attributes:
        model: the model config the step trains.
        mesh: the device mesh every array below lives on.
        lora: the adapters' config (None: full fine-tuning).
        tx: the update direction (clip → Adam → decay; `train.optim.make_optimizer`).
        schedule: the learning rate by ``state.step`` (`train.optim.make_schedule`).
        base_shardings: the base model's parameter shardings (no adapters): ``--init-from``
            weights, merged LoRA params and the eval step use them.
        abstract: the state as sharded ``jax.ShapeDtypeStruct`` leaves (frozen base included with LoRA).
        shardings: the state's `NamedSharding` tree (the train step's in/out shardings).
        train_step: ``(state, batch) -> (state, metrics)``, jitted per batch shape, state donated.
        eval_step: the held-out ``(params, batch) -> (loss_sum, count)`` in ``base_shardings``, jitted per
            batch shape (any length: a loss chunk longer than the rows computes them in one piece).
        loss_chunk: positions per chunk of the chunked cross-entropy.
    """

    model: LlamaConfig
    mesh: Mesh
    lora: lora_lib.LoraConfig | None
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    base_shardings: Any
    abstract: TrainState
    shardings: TrainState
    train_step: CompiledStep
    eval_step: CompiledStep
    loss_chunk: int

    @property
    def restore_target(self) -> TrainState:
        """What a checkpoint is restored onto: the abstract state without the LoRA base it does not hold."""
        return self.abstract.replace(frozen=None)

    def init(self, key: jax.Array, params: Any = None) -> TrainState:
        """A fresh sharded state: params from ``key`` (or ``params``: the base model's), zero moments."""
        return init_state(self.model, self.tx, key, self.shardings, self.base_shardings, params=params, lora=self.lora)

    def frozen(self, base: Any = None, key: jax.Array | None = None) -> Any:
        """A LoRA state's frozen leaves from ``base`` params (or the random base ``init`` draws from ``key``)."""
        return frozen_params(self.lora, self.shardings.frozen, base, model_cfg=self.model, key=key,
                             base_shardings=self.base_shardings)  # fmt: skip

    def merged(self, state: TrainState) -> Any:
        """The base-model params ``state`` stands for (LoRA merged), in ``base_shardings``."""
        return merged_params(state, self.model, self.lora, self.base_shardings)

    def fresh_moments(self, params: Any) -> Any:
        """Zero optimizer state for the trainable ``params``."""
        return init_opt_state(self.tx, params, self.shardings)


def build_engine(
    model_cfg: LlamaConfig,
    optim_cfg: OptimConfig,
    mesh: Mesh,
    *,
    total_steps: int,
    loss_chunk: int = 1024,
    lora: lora_lib.LoraConfig | None = None,
    donate: bool = True,
) -> Engine:
    """Build the optimizer, schedule, shardings and train step of one stage, each exactly once.

    Args:
        model_cfg: the model.
        optim_cfg: optimizer, schedule and ``grad_accum_steps``.
        mesh: the device mesh.
        total_steps: optimizer steps of the stage (the schedule's horizon).
        loss_chunk: positions per chunk of the chunked cross-entropy.
        lora: train LoRA adapters on a frozen base instead of every parameter.
        donate: the train step donates its input state.
    """
    tx = make_optimizer(optim_cfg)
    schedule = make_schedule(optim_cfg, total_steps)
    base_sh = param_shardings(abstract_params(model_cfg), mesh)
    full_sh = param_shardings(abstract_params(model_cfg, lora), mesh) if lora is not None else base_sh
    abstract = abstract_state(model_cfg, tx, full_sh, mesh, lora)
    shardings = state_shardings(abstract)
    step = make_train_step(model_cfg, mesh, tx, schedule, shardings,
                           grad_accum_steps=optim_cfg.grad_accum_steps, loss_chunk=loss_chunk, donate=donate,
                           lora=lora)  # fmt: skip
    eval_step = make_eval_step(model_cfg, mesh, base_sh, loss_chunk=loss_chunk)
    return Engine(model_cfg, mesh, lora, tx, schedule, base_sh, abstract, shardings, step, eval_step, loss_chunk)


@dataclasses.dataclass(frozen=True)
class StageRun:
    """A curriculum stage ready to run: its resolved plan, its engine and its data stream.

    Attributes:
        plan: the resolved stage (`train.config.StagePlan`).
        engine: mesh, optimizer, shardings and steps (`build_engine`).
        data: the training iterator (seeded by the stage's depth on its branch); None when the stage
            was built only to restore its state (a branch source after ``--resume``).
    """

    plan: StagePlan
    engine: Engine
    data: DataIterator | None

    @property
    def mesh(self) -> Mesh:
        return self.engine.mesh


def data_seed(seed: int, depth: int) -> int:
    """The data stream of a stage ``depth`` stages down its branch: distinct and deterministic."""
    return seed * 1009 + depth


def stage_depth(plans: list[StagePlan], plan: StagePlan) -> int:
    """How many stages precede ``plan`` on its branch (its index in a linear curriculum).

    The data stream is seeded by this depth, so sibling branches (``from_stage`` the same stage)
    train on the same documents in the same order: an ablation changes only what its config changes.
    """
    depth, start = 0, start_plan(plans, plan)
    while start is not None:
        depth, start = depth + 1, start_plan(plans, start)
    return depth


def build_stage(
    cfg: TrainConfig, plans: list[StagePlan], plan: StagePlan, *, with_data: bool = True, mesh: Mesh | None = None
) -> StageRun:
    """Everything stage ``plan`` runs with, built once (see the module docstring).

    Args:
        cfg: the run config (``loss_chunk``, ``lora``, ``seed``).
        plans: every stage of the run (``plan``'s depth on its branch seeds its data).
        plan: the stage.
        with_data: build the training iterator (False: the stage is only restored, not trained).
        mesh: reuse this mesh (default: a new one from ``plan.mesh``).
    """
    mesh = make_mesh(plan.mesh) if mesh is None else mesh
    stage = plan.stage
    model_cfg, _ = resolve_context_parallel(plan.model, stage.seq_len, stage.batch_size, mesh)
    engine = build_engine(model_cfg, plan.optim, mesh, total_steps=stage.steps, loss_chunk=cfg.loss_chunk,
                          lora=cfg.lora)  # fmt: skip
    data = None
    if with_data:
        data = make_iterator(
            plan.data,
            stage.seq_len,
            stage.batch_size,
            data_seed(cfg.seed, stage_depth(plans, plan)),
            layout=plan.layout,
            num_shards=dict(mesh.shape)["sequence"],
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            pose=stage.pose,
        )
    return StageRun(plan, engine, data)


def move_state(state: TrainState, stage: StageRun, say=print) -> TrainState:
    """A previous stage's state on ``stage``'s mesh: params kept, moments kept or reset, step 0.

    Adam's moments carry over only when ``carry_optimizer_state`` is set and the optimizer state has
    the same structure (e.g. weight decay switched on or off changes it: then they restart, and we say so).
    A LoRA state keeps its frozen base, resharded like the rest.
    """
    eng, plan = stage.engine, stage.plan
    sh = eng.shardings
    params = jax.device_put(state.params, sh.params)  # a no-op on the same mesh; a reshard otherwise
    carry = plan.stage.carry_optimizer_state
    if carry and jax.tree.structure(state.opt_state) != jax.tree.structure(sh.opt_state):
        say(f"{plan.name}: the optimizer state changes shape between stages; Adam's moments restart from zero")
        carry = False
    opt_state = jax.device_put(state.opt_state, sh.opt_state) if carry else eng.fresh_moments(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    frozen = None if state.frozen is None else jax.device_put(state.frozen, sh.frozen)
    return TrainState(params=params, opt_state=opt_state, step=step, frozen=frozen)


__all__ = ["Engine", "StageRun", "build_engine", "build_stage", "data_seed", "move_state", "stage_depth"]
