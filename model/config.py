"""Model configuration: `LlamaConfig`, a frozen dataclass with HF config I/O (its `RopeConfig` is in `model.rope`).

Hugging Face configs come in two layouts and both are read and written:
- transformers v4: top-level ``rope_theta`` plus ``rope_scaling`` (key ``type`` or ``rope_type``);
- transformers v5: ``rope_parameters`` holding ``rope_theta`` and ``rope_type``.

Plain dicts (a checkpoint's ``ringllama_config.json``, a run config's ``model:`` section) go
through the one config library, `model.schema`; the string under each field is its help text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from model import schema
from model.rope import ROPE_TYPES, RopeConfig
from model.schema import ConfigError, Items

ATTENTION_IMPLS = ("auto", "reference", "xla", "blockwise", "ring", "allgather", "ulysses", "hybrid")
CONTEXT_PARALLEL = ("auto", "ring", "allgather", "ulysses", "hybrid")  # attention.STRATEGIES, or auto
ATTENTION_KERNELS = (
    "auto",
    "jnp",
    "pallas",
    "mosaic_tpu",
    "mosaic_gpu",
    "triton",
    "cudnn",
)  # local kernel of blockwise/ring (attention.choose_kernel)
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LlamaConfig:
    """Llama 3 architecture plus the numerics and execution switches ringllama adds."""

    vocab_size: int = 128256
    """vocabulary size"""
    hidden_size: int = 4096
    """model width d"""
    intermediate_size: int = 14336
    """MLP width f"""
    num_layers: int = 32
    """decoder layers"""
    num_heads: int = 32
    """query heads"""
    num_kv_heads: int = 8
    """key/value heads (GQA; divides num_heads)"""
    head_dim: int = 128
    """per-head width (may differ from hidden_size / num_heads)"""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon"""
    max_position_embeddings: int = 8192
    """context length the model is configured for (curriculum stages update it)"""
    tie_word_embeddings: bool = False
    """share the embedding and output head"""
    rope: RopeConfig = field(default_factory=RopeConfig)
    """RoPE settings, e.g. {theta: 10000}"""
    bos_token_id: int | None = 128000
    """BOS id"""
    eos_token_id: Items[int] = (128001,)
    """EOS id(s)"""
    dtype: str = "float32"
    """compute dtype: float32 | bfloat16 | float16"""
    param_dtype: str = "float32"
    """parameter (master) dtype: float32 | bfloat16 | float16"""
    scan_layers: bool = True
    """stack the layers under one `layers` subtree with a leading [layers] axis, run by lax.scan (flat compile time)"""
    remat_policy: str = "none"
    """jax.checkpoint policy per layer: none | full | dots | dots_with_no_batch_dims"""
    attention_impl: str = "auto"
    """auto | reference | xla | blockwise | ring | allgather | ulysses | hybrid (auto: see context_parallel)"""
    attention_chunk: int = 512
    """KV chunk of blockwise/ring attention"""
    attention_kernel: str = "auto"
    """local kernel: jnp | pallas (the platform's) | mosaic_tpu | mosaic_gpu | triton | auto (pallas on GPU/TPU)"""
    context_parallel: str = "auto"
    """sequence-sharded strategy: ring | allgather | ulysses | hybrid | auto (training: the planner's pick)"""
    ulysses_size: int = 0
    """hybrid: devices per Ulysses group, adjacent on the sequence axis (e.g. a node's 8 GPUs); 0: auto"""

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, int):  # from_hf: HF configs hold one id or a list
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even number for RoPE, got {self.head_dim}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}): "
                "pick a kv head count that divides the query heads."
            )
        for name in ("max_position_embeddings", "attention_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}.")
        for name in ("short_factor", "long_factor"):
            value = getattr(self.rope, name)
            if value is not None and len(value) != self.head_dim // 2:
                raise ConfigError(
                    f"longrope {name} has {len(value)} entries but head_dim {self.head_dim} needs "
                    f"{self.head_dim // 2} (one per frequency): fix the rope settings."
                )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not supported: use one of {', '.join(DTYPES)}.")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"unknown remat_policy {self.remat_policy!r}: use one of {', '.join(REMAT_POLICIES)}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"unknown attention_impl {self.attention_impl!r}: use one of {', '.join(ATTENTION_IMPLS)}."
            )
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ConfigError(
                f"unknown context_parallel {self.context_parallel!r}: use one of {', '.join(CONTEXT_PARALLEL)}."
            )
        if int(self.ulysses_size) < 0:
            raise ConfigError(f"ulysses_size must be 0 (auto) or a positive group size, got {self.ulysses_size}.")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ConfigError(
                f"unknown attention_kernel {self.attention_kernel!r}: use one of {', '.join(ATTENTION_KERNELS)}."
            )

    @property
    def num_groups(self) -> int:
        """Query heads per kv head (the GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        """A copy with ``changes``; ``rope=dict(...)`` updates individual rope fields."""
        rope = changes.pop("rope", None)
        if isinstance(rope, dict):
            changes["rope"] = dataclasses.replace(self.rope, **rope)
        elif rope is not None:
            changes["rope"] = rope
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included, the tied head counted once)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * layer + d + head

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (the ringllama checkpoint's config.json)."""
        return schema.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict` (also a checkpoint's stored dict); unknown keys are an error naming them."""
        return schema.build(cls, data, label={cls: "model config", RopeConfig: "rope"})

    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | os.PathLike, **overrides: Any) -> LlamaConfig:
        """Read a transformers ``LlamaConfig`` dict, or a directory / file holding ``config.json``."""
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ConfigError(f"no config.json at {path}: point at a Hugging Face model directory.")
            try:
                with open(path) as fh:
                    source = json.load(fh)
            except json.JSONDecodeError as exc:
                msg = f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix or replace it."
                raise ConfigError(msg) from exc
        hf = source
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "llama")
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ConfigError(
                f"unsupported architecture {archs or model_type!r}: "
                "ringllama converts LlamaForCausalLM checkpoints only."
            )
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
            if key not in hf:
                raise ConfigError(f"the Hugging Face config lacks {key!r}: it is not a complete Llama config.")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError("this checkpoint uses attention/MLP biases, which Llama 3 does not have.")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported: Llama 3 uses 'silu'.")
        heads = hf["num_attention_heads"]
        rope = _rope_from_hf(hf)
        eos = hf.get("eos_token_id")
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=rope,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=() if eos is None else eos,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """A transformers ``LlamaConfig`` dict carrying both the v4 and the v5 rope layouts."""
        rope_params = self.rope.to_hf_dict()
        rope_scaling = None
        if self.rope.rope_type != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            rope_scaling["type"] = self.rope.rope_type
        eos = list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "rope_theta": self.rope.theta,
            "rope_scaling": rope_scaling,
            "rope_parameters": rope_params,
            "torch_dtype": self.param_dtype,
        }


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """The rope settings of an HF config in either layout (v4 ``rope_scaling``, v5 ``rope_parameters``).

    transformers gives ``rope_scaling`` priority when both are present; a ringllama-written
    config has both and they agree, so disagreement means a hand edit and is an error.
    """
    theta = hf.get("rope_theta", 10000.0)  # transformers' default_theta
    max_pos = hf.get("max_position_embeddings", 2048)

    def build(rope: dict[str, Any]) -> RopeConfig:
        rope = dict(rope)
        kind = ROPE_TYPES.get(rope.get("rope_type", rope.get("type")))
        if kind is not None and "original_max_position_embeddings" in kind.required:
            # Like transformers' LlamaConfig: without it, the pretraining length is the model's own.
            rope.setdefault("original_max_position_embeddings", max_pos)
        return RopeConfig.from_hf_dict(rope, theta)

    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    if scaling and params:
        a, b = build(scaling), build(params)
        if a != b:
            raise ConfigError(
                f"the config's rope_scaling ({scaling}) and rope_parameters ({params}) disagree: "
                "keep one of them (transformers would silently use rope_scaling)."
            )
    return build(scaling or params or {})
