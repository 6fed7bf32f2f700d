"""`TrainConfig`: the whole run in one frozen dataclass, loaded from YAML plus ``--set`` overrides.

    cfg = load_config("configs/demo.yaml", ["stages.1.steps=10", "optim.lr=1e-3"])
    plans = validate(cfg, num_devices=jax.device_count())   # every check that needs no compile

A config names the model (a preset, a Hugging Face directory, or inline `LlamaConfig` fields),
the data mix (`train.data.DataConfig`), the optimizer (`train.optim.OptimConfig`), the mesh
(`sharding.MeshConfig`) and the curriculum: a list of `StageConfig`, each with its sequence
length, θ (given, or from a rule of `model.theta_for_length`), steps, batch, learning rate,
data mix and mesh. `validate` resolves every stage — θ, max positions, mesh, layout — and
checks divisibility and files, so a bad config fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from model.config import ConfigError, LlamaConfig
from model.lora import LoraConfig
from model.presets import PRESETS, preset
from model.rope import theta_for_length
from sharding.mesh import MeshConfig, MeshError
from train.data_config import PASSKEY_TEMPLATES, DataConfig
from train.optim import OptimConfig
from train.pose import PoseConfig, check_pose
from train.typed import apply_override, build, coerce, doc, to_dict

LAYOUTS = ("auto", "contiguous", "zigzag", "striped")
THETA_RULES = ("critical", "ntk")


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage."""

    seq_len: int = doc("tokens per training sequence in this stage")
    steps: int = doc("optimizer steps in this stage")
    batch_size: int = doc("global batch (sequences per optimizer step, all processes together)", 8)
    name: str = doc("label in logs and reports (default stage1, stage2, …)", "")
    theta: float | None = doc(
        "RoPE θ for this stage (exclusive with theta_rule; both unset: keep the previous θ)", None
    )
    theta_rule: str | None = doc(
        "derive θ from the previous stage's (θ, length) with model.theta_for_length: 'critical' or 'ntk'", None
    )
    max_position_embeddings: int | None = doc(
        "max positions written into the model config (default: max(seq_len, the previous value))", None
    )
    lr: float | None = doc("peak learning rate for this stage (overrides optim.lr)", None)
    optim: dict = doc("other OptimConfig fields overridden in this stage, e.g. {warmup_steps: 10}", factory=dict)
    data: dict = doc("DataConfig fields overridden in this stage, e.g. a different sources mix", factory=dict)
    mesh: MeshConfig | None = doc("mesh for this stage (default: the top-level mesh)", None)
    carry_optimizer_state: bool = doc("keep Adam's moments from the previous stage (else start them at zero)", True)
    from_stage: str | None = doc(
        "start from the end of this earlier stage (by name) instead of the previous one: branches for "
        "ablations, e.g. two stage-2 variants from one stage 1 (YAML key `from` or `from_stage`)",
        None,
    )
    pose: PoseConfig | None = doc(
        "PoSE: train at seq_len with position ids spanning target_length, e.g. {target_length: 4096, chunks: 2}; "
        "θ rules and max positions then use target_length",
        None,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run_dir>/checkpoints``."""

    every: int = doc("save every N global steps (0: only at the end of each stage)", 0)
    keep: int = doc("how many checkpoints to keep", 3)
    async_save: bool = doc("save in the background while training continues", True)


@dataclass(frozen=True)
class EvalConfig:
    """What runs at the end of every stage."""

    heldout_batches: int = doc("held-out batches for perplexity at the stage's length and the next one", 2)
    heldout_batch_size: int | None = doc("sequences per held-out batch (default: the stage's batch_size)", None)
    passkey_lengths: tuple[int, ...] = doc("passkey context lengths to score after each stage (empty: skip)", ())
    passkey_samples: int = doc("passkey prompts per length (spread over passkey_depths)", 16)
    passkey_depths: tuple[float, ...] = doc("needle depths (fractions of the haystack) for the passkey grid", (0.5,))
    passkey_filler: str = doc("passkey haystack: 'classic', 'prose' or a text file", "classic")
    passkey_template: str = doc("passkey prompt: 'classic' or 'short' (no instruction head)", "classic")
    passkey_batch: int = doc("passkey prompts per forward pass", 8)


@dataclass(frozen=True)
class ExportConfig:
    """Hugging Face export of the final model."""

    hf: bool = doc("write <run_dir>/hf (safetensors + config.json) at the end", False)
    check_transformers: bool = doc("load the export with transformers and compare logits with ringllama", False)
    greedy_passkey: int = doc(
        "this many fresh passkey prompts at the last stage's length, decoded greedily by transformers (0: skip)", 0
    )


@dataclass(frozen=True)
class TrainConfig:
    """A training run: model, data, optimizer, mesh and the curriculum stages."""

    model: dict = doc(
        "the model: {preset: NAME} or {hf_config: DIR} plus any LlamaConfig field as an override "
        f"(presets: {', '.join(PRESETS)})",
        factory=lambda: {"preset": "tiny"},
    )
    data: DataConfig = doc("the data mix (DataConfig)", factory=DataConfig)
    optim: OptimConfig = doc("AdamW and the learning-rate schedule (OptimConfig)", factory=OptimConfig)
    mesh: MeshConfig = doc("device mesh axes; -1 takes the remaining devices", factory=MeshConfig)
    stages: tuple[StageConfig, ...] = doc("the curriculum, run in order", ())
    checkpoint: CheckpointConfig = doc("checkpointing", factory=CheckpointConfig)
    eval: EvalConfig = doc("end-of-stage evaluation", factory=EvalConfig)
    export: ExportConfig = doc("export of the final model", factory=ExportConfig)
    lora: LoraConfig | None = doc(
        "LoRA adapters on a frozen base instead of full fine-tuning, e.g. {rank: 8, alpha: 16, targets: [q, k, v, o], "
        "train_embeddings: true, train_norms: true} (LongLoRA's recipe; null: train every parameter)",
        None,
    )
    seed: int = doc("seed for init, data order and RNG", 0)
    run_dir: str = doc("where checkpoints, metrics.jsonl, plots and reports go", "runs/default")
    loss_chunk: int = doc("positions per chunk of the chunked cross-entropy", 1024)
    layout: str = doc(
        "token layout over the sequence axis: auto (zigzag when sequence > 1), contiguous, zigzag, striped", "auto"
    )
    device_memory_gb: float | None = doc(
        "per-device memory for the planner check (default: what the device reports)", None
    )
    allow_oversize: bool = doc("start even when the memory planner says the run does not fit", False)
    peak_tflops: float | None = doc("per-device peak TFLOP/s for MFU (default: from the device table)", None)
    tensorboard: bool = doc("also write TensorBoard scalars (needs tensorboardX)", True)
    progress: bool = doc("show a progress bar", True)


# Docs for the LlamaConfig fields accepted under `model:` (LlamaConfig itself lives in model/).
MODEL_FIELD_HELP = {
    "preset": "start from this preset",
    "hf_config": "start from this Hugging Face config (a directory or config.json)",
    "vocab_size": "vocabulary size",
    "hidden_size": "model width d",
    "intermediate_size": "MLP width f",
    "num_layers": "decoder layers",
    "num_heads": "query heads",
    "num_kv_heads": "key/value heads (GQA)",
    "head_dim": "per-head width",
    "rms_norm_eps": "RMSNorm epsilon",
    "max_position_embeddings": "context length the model is configured for (stages update it)",
    "tie_word_embeddings": "share the embedding and output head",
    "rope": "RoPE settings, e.g. {theta: 10000}",
    "bos_token_id": "BOS id",
    "eos_token_id": "EOS id(s)",
    "dtype": "compute dtype (float32 | bfloat16)",
    "param_dtype": "parameter (master) dtype",
    "scan_layers": "stack layers under lax.scan (flat compile time)",
    "remat_policy": "rematerialisation: none | full | dots | dots_with_no_batch_dims",
    "attention_impl": "auto | reference | xla | blockwise | ring",
    "attention_chunk": "KV chunk of blockwise/ring attention",
    "attention_kernel": "local kernel of blockwise/ring: auto (pallas on GPU, jnp elsewhere) | jnp | pallas",
}


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
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy we may edit
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
    cfg = build(TrainConfig, raw, "")
    model_config(cfg)  # check the model section now
    return cfg


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load ``path`` (YAML; None: all defaults) and apply the overrides."""
    return from_dict(read_yaml(path) if path else {}, overrides)


def dump_config(cfg: TrainConfig) -> str:
    """The config as YAML (what a run writes to ``<run_dir>/config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _model_shorthand(text: str) -> dict[str, Any]:
    return {"preset": text} if text in PRESETS or not os.path.exists(text) else {"hf_config": text}


def model_config(cfg: TrainConfig) -> LlamaConfig:
    """The initial `LlamaConfig` described by the ``model`` section."""
    spec = dict(cfg.model)
    name, hf = spec.pop("preset", None), spec.pop("hf_config", None)
    if name is not None and hf is not None:
        raise ConfigError("model.preset and model.hf_config are exclusive: keep one of them.")
    known = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(
            f"unknown config field {', '.join('model.' + k for k in unknown)}: use preset, hf_config "
            f"or LlamaConfig fields ({', '.join(sorted(known))})."
        )
    if hf is not None:
        base = LlamaConfig.from_hf(hf)
    else:
        base = preset(name or "tiny")
    hints = typing.get_type_hints(LlamaConfig)
    changes = {}
    for key, value in spec.items():
        if key == "rope" and isinstance(value, dict):
            rope_hints = typing.get_type_hints(type(base.rope))
            bad = sorted(set(value) - set(rope_hints))
            if bad:
                raise ConfigError(
                    f"unknown config field {', '.join('model.rope.' + k for k in bad)}: fix the spelling."
                )
            changes["rope"] = {k: coerce(v, rope_hints[k], f"model.rope.{k}") for k, v in value.items()}
        else:
            changes[key] = coerce(value, hints[key], f"model.{key}")
    return base.replace(**changes)


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
    from attention.layout import LayoutError, check_layout

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
        optim = build(OptimConfig, {**to_dict(cfg.optim), **optim_changes}, f"{where}.optim")
        if stage.batch_size % optim.grad_accum_steps:
            raise ConfigError(
                f"{where}.batch_size {stage.batch_size} is not divisible by optim.grad_accum_steps "
                f"{optim.grad_accum_steps}: make the batch a multiple of it."
            )
        data = build(DataConfig, {**to_dict(cfg.data), **stage.data}, f"{where}.data") if stage.data else cfg.data
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
OPTIM_FIELD_HELP = {
    "lr": "peak learning rate",
    "schedule": "cosine | linear | constant (after warmup)",
    "warmup_steps": "linear warmup steps at the start of every stage",
    "min_lr_ratio": "final learning rate as a fraction of lr",
    "weight_decay": "decoupled weight decay on matmul kernels (not norms or embeddings)",
    "b1": "Adam β1",
    "b2": "Adam β2",
    "eps": "Adam ε",
    "clip_norm": "global gradient-norm clipping (0: off)",
    "grad_accum_steps": "micro-batches per optimizer step",
}
MESH_FIELD_HELP = {
    "data": "data-parallel replicas",
    "fsdp": "fully-sharded data parallel (params and optimizer state sharded)",
    "tensor": "tensor parallel (heads, MLP)",
    "sequence": "sequence parallel: the ring of ring attention",
}


def config_help() -> str:
    """Every config field, one line each (``--help`` shows this)."""
    from train.typed import field_help

    extra = {OptimConfig: OPTIM_FIELD_HELP, MeshConfig: MESH_FIELD_HELP}
    lines = []
    for line in field_help(TrainConfig, "", extra):
        lines.append(line)
        if line.startswith("model ("):
            hints = typing.get_type_hints(LlamaConfig)
            for name, text in MODEL_FIELD_HELP.items():
                kind = "str" if name in ("preset", "hf_config") else _type_label(hints.get(name))
                lines.append(f"model.{name} ({kind}): {text}")
    return "\n".join(lines)


def _type_label(tp: Any) -> str:
    from train.typed import type_name

    return "mapping" if dataclasses.is_dataclass(tp) else type_name(tp)
