"""Runner plumbing between stages: the memory check, weights from --init-from, moving state to a new stage.

`check_memory` asks the memory planner (`sharding.plan_memory`) about every stage before
anything is compiled and refuses a run that will not fit, quoting the planner's numbers.
`move_state` carries params (and optionally Adam's moments) from one stage to the next,
resharding onto the next stage's mesh and restarting the stage's step counter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.config import ConfigError
from model.params import abstract_params
from sharding.rules import param_shardings
from train.config import StagePlan, TrainConfig
from train.state import TrainState, init_opt_state, state_shardings

GIB = 1024**3


def device_memory_bytes(cfg: TrainConfig) -> tuple[int | None, str]:
    """Per-device memory to plan against: the config's ``device_memory_gb``, else what the device reports."""
    if cfg.device_memory_gb:
        return int(cfg.device_memory_gb * GIB), "device_memory_gb from the config"
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # CPU backends may not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} reports it"
    return None, "the device reports no memory limit (CPU); set device_memory_gb to check"


def check_memory(cfg: TrainConfig, plans: list[StagePlan], say=print, num_devices: int | None = None) -> list[dict]:
    """Plan every stage's per-device memory; raise `ConfigError` if one will not fit (unless allowed).

    Returns one row per stage with the planner's total and the limit (for the report).
    """
    try:
        from sharding import plan_memory
    except ImportError:
        say("memory planner not available (sharding.plan_memory): skipping the fit check")
        return []
    limit, source = device_memory_bytes(cfg)
    num_devices = jax.device_count() if num_devices is None else num_devices
    rows = []
    for plan in plans:
        remat = plan.model.remat_policy
        report = plan_memory(plan.model, abstract_params(plan.model, cfg.lora), seq_len=plan.stage.seq_len,
                             batch=plan.stage.batch_size, mesh=plan.mesh,
                             remat=remat, loss_chunk=cfg.loss_chunk, num_devices=num_devices,
                             lora=cfg.lora)  # fmt: skip
        total = int(report.total)
        rows.append({"stage": plan.name, "per_device_bytes": total, "limit_bytes": limit})
        text = f"{plan.name}: planner estimates {total / GIB:.2f} GiB per device"
        if limit is None:
            say(f"{text} ({source})")
            continue
        say(f"{text} of {limit / GIB:.2f} GiB ({source})")
        if total > limit and not cfg.allow_oversize:
            detail = _breakdown(report)
            raise ConfigError(
                f"{plan.name} will not fit: the memory planner estimates {total / GIB:.2f} GiB per device "
                f"({detail}) but a device has {limit / GIB:.2f} GiB; use more devices on fsdp/sequence, a smaller "
                "batch, remat_policy: full, or set allow_oversize: true to try anyway."
            )
    return rows


def _breakdown(report) -> str:
    """The planner's non-zero categories, e.g. ``parameters 1.00 GiB, optimizer state 2.00 GiB``."""
    parts = [(label, getattr(report, name)) for name, label in report.ROWS]
    return ", ".join(f"{label} {v / GIB:.2f} GiB" for label, v in parts if v > 0)


def init_from_model(path: str, plan: StagePlan, mesh: Mesh, say=print):
    """Parameters from a ringllama checkpoint or HF directory, placed straight into the stage's shardings."""
    import convert

    say(f"loading initial weights from {path}")
    _, params = convert.load_model(
        path,
        dtype=plan.model.param_dtype,
        scan_layers=plan.model.scan_layers,
        mesh_shardings=param_shardings(abstract_params(plan.model), mesh),
    )
    return params


def move_state(state: TrainState, prev: StagePlan, plan: StagePlan, mesh: Mesh, say=print, lora=None) -> TrainState:
    """The previous stage's state on ``plan``'s mesh: params kept, moments kept or reset, step 0.

    Adam's moments carry over only when ``carry_optimizer_state`` is set and the optimizer state has
    the same structure (e.g. weight decay switched on or off changes it: then they restart, and we say so).
    A LoRA state (``lora``) keeps its frozen base, resharded like the rest.
    """
    sh = state_shardings(plan.model, plan.optim, mesh, lora)
    params = jax.device_put(state.params, sh.params)  # a no-op on the same mesh; a reshard otherwise
    carry = plan.stage.carry_optimizer_state
    if carry and jax.tree.structure(state.opt_state) != jax.tree.structure(sh.opt_state):
        say(f"{plan.name}: the optimizer state changes shape between stages; Adam's moments restart from zero")
        carry = False
    opt_state = jax.device_put(state.opt_state, sh.opt_state) if carry else init_opt_state(params, plan.optim, sh)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    frozen = None if state.frozen is None else jax.device_put(state.frozen, sh.frozen)
    return TrainState(params=params, opt_state=opt_state, step=step, frozen=frozen)
