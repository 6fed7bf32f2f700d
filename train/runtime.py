"""Runner plumbing around the stages: the memory check and weights from --init-from.

`check_memory` asks the memory planner (`sharding.plan_memory`) about every stage before
anything is compiled and refuses a run that will not fit, quoting the planner's numbers.
`init_from_model` loads ``--init-from`` weights straight into a stage engine's shardings.
"""

from __future__ import annotations

import flax.linen as nn
import jax

import convert
from model.config import ConfigError
from model.params import abstract_params
from sharding import plan_memory
from train.checkpoint import is_training_checkpoint, step_params
from train.config import StagePlan, TrainConfig
from train.stage import Engine

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


def init_from_model(path: str, engine: Engine, say=print):
    """Parameters from a ringllama checkpoint, HF directory or training checkpoint step, in the engine's shardings."""
    say(f"loading initial weights from {path}")
    if is_training_checkpoint(path):
        shapes = nn.unbox(abstract_params(engine.model))
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                              engine.base_shardings)  # fmt: skip
        return step_params(path, target)
    _, params = convert.load_model(
        path,
        dtype=engine.model.param_dtype,
        scan_layers=engine.model.scan_layers,
        mesh_shardings=engine.base_shardings,
    )
    return params
