"""The sections of a run config as frozen dataclasses; the string under each field is its help text.

`TrainConfig` holds the model (a mapping: a preset or Hugging Face directory plus `LlamaConfig`
overrides, resolved by `train.config.model_config`), the data mix (`DataConfig`), the optimizer
(`OptimConfig`), the mesh (`MeshConfig`), LoRA (`LoraConfig`) and the curriculum (`StageConfig`
items, each with an optional `PoseConfig`). `train.config` reads, checks and resolves them through
the one config library (`model.schema`), and ``python -m train --help`` prints these docstrings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.lora import LoraConfig
from model.schema import Items
from sharding.mesh import MeshConfig
from train.data_config import DataConfig
from train.optim import OptimConfig
from train.pose import PoseConfig

LAYOUTS = ("auto", "contiguous", "zigzag", "striped")
THETA_RULES = ("critical", "ntk")
# The keys of the `model:` section besides LlamaConfig's own fields.
MODEL_SOURCES = {
    "preset": "start from this preset",
    "hf_config": "start from this Hugging Face config (a directory or config.json)",
}


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage."""

    seq_len: int
    """tokens per training sequence in this stage"""
    steps: int
    """optimizer steps in this stage"""
    batch_size: int = 8
    """global batch (sequences per optimizer step, all processes together)"""
    name: str = ""
    """label in logs and reports (default stage1, stage2, …)"""
    theta: float | None = None
    """RoPE θ for this stage (exclusive with theta_rule; both unset: keep the previous θ)"""
    theta_rule: str | None = None
    """derive θ from the previous stage's (θ, length) with model.theta_for_length: 'critical' or 'ntk'"""
    max_position_embeddings: int | None = None
    """max positions written into the model config (default: max(seq_len, the previous value))"""
    lr: float | None = None
    """peak learning rate for this stage (overrides optim.lr)"""
    optim: dict = field(default_factory=dict)
    """other OptimConfig fields overridden in this stage, e.g. {warmup_steps: 10}"""
    data: dict = field(default_factory=dict)
    """DataConfig fields overridden in this stage, e.g. a different sources mix"""
    mesh: MeshConfig | None = None
    """mesh for this stage (default: the top-level mesh)"""
    carry_optimizer_state: bool = True
    """keep Adam's moments from the previous stage (else start them at zero)"""
    from_stage: str | None = None
    """start from the end of this earlier stage (by name) instead of the previous one: branches for
    ablations, e.g. two stage-2 variants from one stage 1 (YAML key `from` or `from_stage`)"""
    pose: PoseConfig | None = None
    """PoSE: train at seq_len with position ids spanning target_length, e.g. {target_length: 4096, chunks: 2};
    θ rules and max positions then use target_length"""


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints under ``<run_dir>/checkpoints``."""

    every: int = 0
    """save every N global steps (0: only at the end of each stage)"""
    keep: int = 3
    """how many checkpoints to keep"""
    async_save: bool = True
    """save in the background while training continues"""


@dataclass(frozen=True)
class EvalConfig:
    """What runs at the end of every stage."""

    heldout_batches: int = 2
    """held-out batches for perplexity at the stage's length and the next one"""
    heldout_batch_size: int | None = None
    """sequences per held-out batch (default: the stage's batch_size)"""
    passkey_lengths: Items[int] = ()
    """passkey context lengths to score after each stage (empty: skip)"""
    passkey_samples: int = 16
    """passkey prompts per length (spread over passkey_depths)"""
    passkey_depths: Items[float] = (0.5,)
    """needle depths (fractions of the haystack) for the passkey grid"""
    passkey_filler: str = "classic"
    """passkey haystack: 'classic', 'prose' or a text file"""
    passkey_template: str = "classic"
    """passkey prompt: 'classic' or 'short' (no instruction head)"""
    passkey_batch: int = 8
    """passkey prompts per forward pass"""
    curve_every: int = 0
    """also score passkey every N steps of each training stage, for learning curves (0: only at stage ends)"""
    curve_lengths: Items[int] = ()
    """context lengths of the learning-curve points (default: the stage's target length and twice it)"""
    curve_samples: int = 20
    """passkey prompts per length at each learning-curve point"""


@dataclass(frozen=True)
class ExportConfig:
    """Hugging Face export of the final model."""

    hf: bool = False
    """write <run_dir>/hf (safetensors + config.json) at the end"""
    check_transformers: bool = False
    """load the export with transformers and compare logits with ringllama"""
    greedy_passkey: int = 0
    """this many fresh passkey prompts at the last stage's length, decoded greedily by transformers (0: skip)"""


@dataclass(frozen=True)
class TrainConfig:
    """A training run: model, data, optimizer, mesh and the curriculum stages."""

    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    """the model: {preset: NAME} or {hf_config: DIR} plus any LlamaConfig field as an override (the
    shorthand `model: NAME` names a preset or a directory; default {preset: tiny})"""
    data: DataConfig = field(default_factory=DataConfig)
    """the data mix (DataConfig)"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the learning-rate schedule (OptimConfig)"""
    mesh: MeshConfig = field(default_factory=MeshConfig)
    """device mesh axes; -1 takes the remaining devices"""
    stages: Items[StageConfig] = ()
    """the curriculum, run in order"""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """checkpointing"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """end-of-stage evaluation"""
    export: ExportConfig = field(default_factory=ExportConfig)
    """export of the final model"""
    lora: LoraConfig | None = None
    """LoRA adapters on a frozen base instead of full fine-tuning, e.g. {rank: 8, alpha: 16, targets: [q, k, v, o],
    train_embeddings: true, train_norms: true} (LongLoRA's recipe; null: train every parameter)"""
    seed: int = 0
    """seed for init, data order and RNG"""
    run_dir: str = "runs/default"
    """where checkpoints, metrics.jsonl, plots and reports go"""
    loss_chunk: int = 1024
    """positions per chunk of the chunked cross-entropy"""
    layout: str = "auto"
    """token layout over the sequence axis: auto (zigzag when sequence > 1), contiguous, zigzag, striped"""
    device_memory_gb: float | None = None
    """per-device memory for the planner check (default: what the device reports)"""
    allow_oversize: bool = False
    """start even when the memory planner says the run does not fit"""
    peak_tflops: float | None = None
    """per-device peak TFLOP/s for MFU (default: from the device table)"""
    tensorboard: bool = True
    """also write TensorBoard scalars (needs tensorboardX)"""
    progress: bool = True
    """show a progress bar"""
