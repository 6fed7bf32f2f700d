"""Run configs: YAML plus ``--set`` overrides → `TrainConfig`, resolved per stage into `StagePlan` records.

    cfg = load_config("configs/demo.yaml", ["stages.1.steps=10", "optim.lr=1e-3"])
    plans = validate(cfg, num_devices=jax.device_count())   # every check that needs no compile

The sections are the dataclasses of `train.config_types`; reading, type checks and the help text
go through the one config library (`model.schema`, pydantic). A config names the model (a preset,
a Hugging Face directory, or inline `LlamaConfig` fields), the data mix, the optimizer, the mesh
and the curriculum: a list of `StageConfig`, each with its sequence length, θ (given, or from a
rule of `model.theta_for_length`), steps, batch, learning rate, data mix and mesh. `validate`
resolves every stage — θ, max positions, mesh, layout — and checks divisibility and files, so a
bad config fails before anything is compiled.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from attention.layout import LayoutError, check_layout
from model import schema
from model.config import ConfigError, LlamaConfig
from model.presets import PRESETS, preset
from model.rope import theta_for_length
from sharding.mesh import MeshConfig, MeshError
from train.config_types import (
    LAYOUTS,
    MODEL_SOURCES,
    THETA_RULES,
    CheckpointConfig,
    EvalConfig,
    ExportConfig,
    StageConfig,
    TrainConfig,
)
from train.data_config import PASSKEY_TEMPLATES, DataConfig
from train.optim import OptimConfig
from train.pose import check_pose

__all__ = [
    "CheckpointConfig",
    "EvalConfig",
    "ExportConfig",
    "StageConfig",
    "StagePlan",
    "TrainConfig",
    "apply_override",
    "config_help",
    "dump_config",
    "from_dict",
    "load_config",
    "model_config",
    "read_yaml",
    "start_plan",
    "validate",
]


@dataclass(frozen=True)
class StagePlan:
    """A stage with everything resolved: the model config it trains, its optimizer, mesh and data."""

    index: int
    name: str
    stage: StageConfig
    model: LlamaConfig
    optim: OptimConfig
    mesh: MeshConfig
    mesh_shape: tuple[int, ...]
    data: DataConfig
    layout: str


# ----------------------------------------------------------------------------------- loading
def read_yaml(path: str) -> dict[str, Any]:
    """The raw dict of a YAML config file."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: pass --config with a YAML file (see configs/).")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc}): fix the syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config fields at the top level.")
    return raw


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A `TrainConfig` from a raw dict with ``key.sub=value`` overrides applied first."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy we may edit (mappings in sorted key order)
    if isinstance(raw.get("model"), str):
        raw["model"] = _model_shorthand(raw["model"])
    for item in overrides:
        apply_override(raw, item)
    if isinstance(raw.get("model"), str):
        raw["model"] = _model_shorthand(raw["model"])
    for i, stage in enumerate(raw.get("stages") or ()):
        if isinstance(stage, dict) and "from" in stage:  # `from` is a Python keyword: the field is from_stage
            if "from_stage" in stage:
                raise ConfigError(f"stages.{i} sets both from and from_stage: keep one of them.")
            stage["from_stage"] = stage.pop("from")
    cfg = schema.build(TrainConfig, raw)
    model_config(cfg)  # check the model section now
    return cfg


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load ``path`` (YAML; None: all defaults) and apply the overrides."""
    return from_dict(read_yaml(path) if path else {}, overrides)


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML (what a run writes to ``<run_dir>/config.yaml``; `from_dict` reads it back)."""
    return yaml.safe_dump(schema.to_dict(cfg), sort_keys=False)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.0.c=value`` to the raw config dict in place (list items by index).

    The value is YAML (``[256, 512]``, ``null`` or ``none``, ``{a: 1}``; anything else stays text), and
    the edited dict then goes through the same checks as the file it overrides.
    """
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} is not key=value: write e.g. --set optim.lr=1e-3.")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and value.strip().lower() == "none":  # Python's spelling of YAML's null
        value = None
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        path, last = ".".join(parts[: depth + 1]), depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {path} indexes a list of {len(node)} items; use 0..{len(node) - 1}.")
            part = int(part)
        elif not last and node.get(part) is None:
            node[part] = {}
        if last:
            node[part] = value
        elif not isinstance(node[part], (dict, list)):
            raise ConfigError(f"--set {key}: {path} is {node[part]!r}, not a mapping, so it has no sub-fields.")
        else:
            node = node[part]


def _model_shorthand(text: str) -> dict[str, Any]:
    return {"preset": text} if text in PRESETS or not os.path.exists(text) else {"hf_config": text}


def model_config(cfg: TrainConfig) -> LlamaConfig:
    """The initial `LlamaConfig` described by the ``model`` section: its preset or HF config plus overrides."""
    spec = dict(cfg.model)
    name, hf = spec.pop("preset", None), spec.pop("hf_config", None)
    if name is not None and hf is not None:
        raise ConfigError("model.preset and model.hf_config are exclusive: keep one of them.")
    base = LlamaConfig.from_hf(hf) if hf is not None else preset(name or "tiny")
    raw = base.to_dict()
    if isinstance(spec.get("rope"), dict):  # rope fields override one by one, like LlamaConfig.replace
        raw["rope"] = {**raw["rope"], **spec.pop("rope")}
    return schema.build(LlamaConfig, {**raw, **spec}, "model")


# -------------------------------------------------------------------------------- validation
def resolve_layout(layout: str, sequence: int) -> str:
    """``auto`` → zigzag when the sequence axis is sharded, else contiguous."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is unknown: use one of {', '.join(LAYOUTS)}.")
    if layout == "auto":
        return "zigzag" if sequence > 1 else "contiguous"
    return layout


def stage_theta(stage: StageConfig, prev_theta: float, prev_len: int, head_dim: int, where: str) -> float:
    """The stage's θ: given, from a rule relative to the previous (θ, length), or unchanged."""
    if stage.theta is not None and stage.theta_rule is not None:
        raise ConfigError(f"{where} sets both theta and theta_rule: keep one of them.")
    if stage.theta is not None:
        if not stage.theta > 1:
            raise ConfigError(f"{where}.theta must be above 1, got {stage.theta}.")
        return float(stage.theta)
    if stage.theta_rule is None:
        return float(prev_theta)
    if stage.theta_rule not in THETA_RULES:
        raise ConfigError(f"{where}.theta_rule {stage.theta_rule!r} is unknown: use one of {', '.join(THETA_RULES)}.")
    # Both rules are power laws in the length, so chaining stage by stage equals one jump from the base.
    return theta_for_length(stage_length(stage), prev_theta, prev_len, head_dim, rule=stage.theta_rule)


def stage_length(stage: StageConfig) -> int:
    """The length a stage's positions span: ``pose.target_length`` under PoSE, else ``seq_len``."""
    return stage.pose.target_length if stage.pose is not None else stage.seq_len


def validate(
    cfg: TrainConfig, num_devices: int, process_count: int = 1, base_model: LlamaConfig | None = None
) -> list[StagePlan]:
    """Resolve every stage and check everything that can be checked without compiling.

    Args:
        cfg: the run config.
        num_devices: global device count (all processes).
        process_count: processes in the run (the global batch is split between them).
        base_model: the model the first stage starts from (default: the ``model`` section);
            ``--init-from`` / ``--resume`` pass the checkpoint's.

    Returns:
        One `StagePlan` per stage.

    Raises:
        ConfigError: with one sentence naming the field and the fix.
    """
    if not cfg.stages:
        raise ConfigError("the config has no stages: add at least one under stages: (seq_len, steps, batch_size).")
    for name in ("seed", "loss_chunk"):
        if getattr(cfg, name) < (0 if name == "seed" else 1):
            raise ConfigError(f"{name} must be {'≥ 0' if name == 'seed' else 'positive'}, got {getattr(cfg, name)}.")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError("checkpoint.every must be ≥ 0 and checkpoint.keep ≥ 1.")
    if cfg.eval.passkey_template not in PASSKEY_TEMPLATES:
        raise ConfigError(
            f"eval.passkey_template is {cfg.eval.passkey_template!r}: use one of {', '.join(PASSKEY_TEMPLATES)}."
        )
    model = base_model or model_config(cfg)
    prev_theta, prev_len = model.rope.theta, model.max_position_embeddings
    plans = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages.{i}"
        if stage.from_stage is not None:  # a branch: θ rules and max positions continue from that stage
            src = source_plan(plans, stage.from_stage, where)
            model, prev_theta, prev_len = src.model, src.model.rope.theta, stage_length(src.stage)
        for field_name in ("seq_len", "steps", "batch_size"):
            value = getattr(stage, field_name)
            if value < (0 if field_name == "steps" else 1):
                raise ConfigError(
                    f"{where}.{field_name} must be {'≥ 0' if field_name == 'steps' else '≥ 1'}, got {value}."
                )
        if stage.pose is not None:
            check_pose(stage.pose, stage.seq_len, f"{where}.pose")
        theta = stage_theta(stage, prev_theta, prev_len, model.head_dim, where)
        max_pos = stage.max_position_embeddings or max(stage_length(stage), model.max_position_embeddings)
        model = model.replace(rope=dict(theta=theta), max_position_embeddings=int(max_pos))
        prev_theta, prev_len = theta, stage_length(stage)

        mesh_cfg = stage.mesh or cfg.mesh
        try:
            shape = mesh_cfg.resolve(num_devices)
        except MeshError as exc:
            raise ConfigError(f"{where if stage.mesh else 'mesh'}: {exc}") from None
        sizes = dict(zip(("data", "fsdp", "tensor", "sequence"), shape, strict=True))
        layout = resolve_layout(cfg.layout, sizes["sequence"])
        try:
            check_layout(stage.seq_len, sizes["sequence"], layout)
        except LayoutError as exc:
            raise ConfigError(f"{where}.seq_len: {exc}") from None
        batch_shards = sizes["data"] * sizes["fsdp"]
        if stage.batch_size % batch_shards or stage.batch_size % process_count:
            need = batch_shards * process_count // math.gcd(batch_shards, process_count)
            raise ConfigError(
                f"{where}.batch_size {stage.batch_size} is not divisible by the {batch_shards} batch shards "
                f"(data × fsdp) and {process_count} process(es): use a multiple of {need}."
            )
        optim_changes = dict(stage.optim)
        if stage.lr is not None:
            optim_changes["lr"] = stage.lr
        optim = schema.build(OptimConfig, {**schema.to_dict(cfg.optim), **optim_changes}, f"{where}.optim")
        if stage.batch_size % optim.grad_accum_steps:
            raise ConfigError(
                f"{where}.batch_size {stage.batch_size} is not divisible by optim.grad_accum_steps "
                f"{optim.grad_accum_steps}: make the batch a multiple of it."
            )
        data = cfg.data
        if stage.data:
            data = schema.build(DataConfig, {**schema.to_dict(cfg.data), **stage.data}, f"{where}.data")
        name = stage.name or f"stage{i + 1}"
        if any(p.name == name for p in plans):
            raise ConfigError(f"{where}.name {name!r} is used by an earlier stage: give every stage its own name.")
        plans.append(StagePlan(i, name, stage, model, optim, mesh_cfg, shape, data, layout))
    return plans


def source_plan(plans: list[StagePlan], name: str, where: str) -> StagePlan:
    """The earlier stage a ``from_stage`` names; `ConfigError` when there is none."""
    for p in plans:
        if p.name == name:
            return p
    known = ", ".join(repr(p.name) for p in plans) or "none"
    raise ConfigError(f"{where}.from names {name!r}, which is not an earlier stage (earlier stages: {known}): "
                      "name a stage listed above this one.")  # fmt: skip


def start_plan(plans: list[StagePlan], plan: StagePlan) -> StagePlan | None:
    """The stage whose final state ``plan`` starts from: its ``from_stage``, else the one before it."""
    if plan.stage.from_stage is not None:
        return source_plan(plans[: plan.index], plan.stage.from_stage, f"stages.{plan.index}")
    return plans[plan.index - 1] if plan.index > 0 else None


# ------------------------------------------------------------------------------------- help
def config_help() -> str:
    """Every config field, one line each (``--help`` shows this), generated from the field docstrings."""
    lines = []
    for line in schema.help_lines(TrainConfig):
        lines.append(line)
        if line.startswith("model ("):
            lines.append(f"model.preset (str): {MODEL_SOURCES['preset']}: one of {', '.join(PRESETS)}")
            lines.append(f"model.hf_config (str): {MODEL_SOURCES['hf_config']}")
            lines.extend(schema.help_lines(LlamaConfig, "model."))
    return "\n".join(lines)
