"""LoRA adapters (Hu et al. 2021) as pure functions over the parameter tree, plus their config.

An adapted kernel ``W`` (``[in…, out…]``, e.g. ``q_proj`` ``[d, n, h]``) gets two factors beside it
in the tree, ``lora_a`` ``[in…, r]`` and ``lora_b`` ``[r, out…]``, and the layer computes
``x·W + (α/r)·(x·A)·B`` — never the merged ``W + (α/r)·A·B`` — so the frozen ``W`` needs no weight
gradient and the rank-r path costs O(t·r·(in + out)). ``A`` starts random (kaiming-uniform, as PEFT
does, from the init key), ``B`` at zero, so the adapted model starts equal to the base.

Logical names: ``A`` keeps the kernel's input names and ``B`` its output names, with ``lora_rank``
(never sharded) for r, so the one rules table (`sharding.rules`) shards each factor like its base
weight: ``A`` over the input's mesh axes, ``B`` over the output's.

Tree plumbing (`trainable_mask`, `split`, `combine`, `merge`) works on nested dicts by leaf path, so
scanned (``layers/…`` with a leading ``[layers]`` axis) and unrolled (``layers_i/…``) trees are alike.
LongLoRA's recipe ("LoRA+", Chen et al. 2023) is the default: attention targets plus trainable
embeddings and norms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import schema
from model.config import DTYPES, ConfigError
from model.schema import Items

# Config name → the kernel's module name (as in the param tree and HF).
TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
TARGET_OF = {module: short for short, module in TARGETS.items()}
ADAPTER_LEAVES = ("lora_a", "lora_b")
RANK_AXIS = "lora_rank"


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the chosen kernels; everything else frozen unless listed trainable."""

    rank: int = 8
    """r, the adapters' inner width (≥ 1)"""
    alpha: float = 16.0
    """the update is scaled by alpha / rank"""
    dropout: float = 0.0
    """LoRA dropout on the adapter input; only 0 is supported"""
    targets: Items[str] = ("q", "k", "v", "o")
    """adapted kernels, from q, k, v, o, gate, up, down"""
    train_embeddings: bool = True
    """also train the token embedding (LongLoRA's "LoRA+")"""
    train_norms: bool = True
    """also train every RMSNorm scale (LongLoRA's "LoRA+")"""
    base_dtype: str | None = None
    """dtype the frozen base is stored in (null: the model's param_dtype; bfloat16 halves it)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora.rank must be an int ≥ 1, got {self.rank!r}: set e.g. lora.rank=8.")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}: the update is scaled by alpha/rank.")
        if self.dropout != 0:
            raise ConfigError(f"lora.dropout {self.dropout!r} is not supported: set lora.dropout=0.")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            what = f"unknown lora target {unknown[0]!r}" if unknown else f"lora.targets {list(self.targets)!r}"
            raise ConfigError(f"{what}: list each of {', '.join(TARGETS)} at most once (at least one).")
        if self.base_dtype is not None and self.base_dtype not in DTYPES:
            raise ConfigError(f"lora.base_dtype {self.base_dtype!r} is not supported: use one of {', '.join(DTYPES)}.")

    @property
    def scale(self) -> float:
        """The factor ``α / r`` on ``x·A·B``."""
        return float(self.alpha) / int(self.rank)

    @property
    def modules(self) -> tuple[str, ...]:
        """The adapted kernels' module names (``q_proj`` …)."""
        return tuple(TARGETS[t] for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        return schema.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        return schema.build(cls, dict(data), label="lora")


# ------------------------------------------------------------------------------ params and math
def factor_shapes(
    shape: tuple[int, ...], names: tuple[str, ...], n_in: int, rank: int
) -> tuple[tuple[tuple[int, ...], tuple[str, ...]], tuple[tuple[int, ...], tuple[str, ...]]]:
    """``((A shape, A names), (B shape, B names))`` for a kernel whose first ``n_in`` dims are inputs."""
    a = ((*shape[:n_in], rank), (*names[:n_in], RANK_AXIS))
    b = ((rank, *shape[n_in:]), (RANK_AXIS, *names[n_in:]))
    return a, b


def _init_a(n_in: int):
    # PEFT's default: kaiming_uniform(a=√5), i.e. U(±1/√fan_in) over the flattened input dims.
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)


def create_factors(
    module: nn.Module, shape: tuple[int, ...], names: tuple[str, ...], n_in: int, rank: int, dtype
) -> tuple[jax.Array, jax.Array]:
    """Declare ``lora_a`` (random) and ``lora_b`` (zeros) in ``module``'s scope (inside its compact call)."""
    (a_shape, a_names), (b_shape, b_names) = factor_shapes(shape, names, n_in, rank)
    a = module.param("lora_a", nn.with_logical_partitioning(_init_a(n_in), a_names), a_shape, jnp.dtype(dtype))
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, b_names), b_shape, jnp.dtype(dtype))
    return a, b


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale · (x·A)·B``: ``x`` ``[b, t, in…]``, ``A`` ``[in…, r]``, ``B`` ``[r, out…]`` → ``[b, t, out…]``."""
    n_in = a.ndim - 1
    xa_btr = jnp.tensordot(x, a.astype(x.dtype), axes=n_in)  # [b, t, r]
    return scale * jnp.tensordot(xa_btr, b.astype(x.dtype), axes=1)  # [b, t, out…]


def add_delta(y: jax.Array, x: jax.Array, factors: tuple[jax.Array, jax.Array] | None, lora: Any) -> jax.Array:
    """``y + delta(x, A, B)`` for an adapted kernel; ``y`` unchanged when ``factors`` is None."""
    if factors is None:
        return y
    return y + delta(x, *factors, lora.scale).astype(y.dtype)


def merged_kernel(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``W + scale·A·B`` in fp32, in W's shape (leading ``[layers]`` axis allowed on all three)."""
    stacked = (a.ndim - 1) + (b.ndim - 1) == w.ndim + 1  # A and B both carry the [layers] axis
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if stacked:  # [l, in…, r] · [l, r, out…]
        ab = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a32, b32)
    else:
        ab = jnp.tensordot(a32, b32, axes=1)  # [in…, out…]
    return w.astype(jnp.float32) + scale * ab


# --------------------------------------------------------------------------------- tree plumbing
def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def is_trainable(keys: tuple[str, ...], lora: LoraConfig) -> bool:
    """Whether the leaf at ``keys`` trains under ``lora``: adapters, plus embeddings/norms if asked."""
    last = keys[-1]
    if last in ADAPTER_LEAVES:
        return True
    if lora.train_embeddings and keys[-2:] == ("embed_tokens", "embedding"):
        return True
    return lora.train_norms and last == "scale"


def trainable_mask(params: Any, lora: LoraConfig) -> Any:
    """A tree of bools matching ``params`` (True: gets gradients and optimizer state)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable(_keys(p), lora), params)


def _prune(tree: Any, keep: Any) -> Any:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            sub = _prune(v, keep[k])
            if sub is not None:
                out[k] = sub
        return out or None
    return tree if keep else None


def split(params: Any, lora: LoraConfig) -> tuple[dict, dict]:
    """``(trainable, frozen)``: two nested dicts holding disjoint leaves of ``params`` (`combine` inverts)."""
    mask = trainable_mask(params, lora)
    flip = jax.tree.map(lambda m: not m, mask)
    return _prune(params, mask) or {}, _prune(params, flip) or {}


def combine(a: Any, b: Any) -> Any:
    """Deep union of two nested dicts with disjoint leaves."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise ValueError("combine: both trees hold the same leaf; split them with model.lora.split.")
    out = dict(a)
    for k, v in b.items():
        out[k] = combine(a[k], v) if k in a else v
    return out


def adapters(params: Any) -> dict:
    """Only the ``lora_a``/``lora_b`` leaves of ``params``."""
    mask = jax.tree_util.tree_map_with_path(lambda p, _: _keys(p)[-1] in ADAPTER_LEAVES, params)
    return _prune(params, mask) or {}


def merge(params: Any, lora: LoraConfig, dtype: Any = None) -> dict:
    """The base-model tree with every adapted kernel replaced by ``W + (α/r)·A·B`` (adapters dropped).

    ``dtype``: of the merged kernels (default: the kernel's own). Untouched leaves are returned as is.
    """

    def walk(node):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node:
            w = node["kernel"]
            merged = merged_kernel(w, node["lora_a"], node["lora_b"], lora.scale)
            return {"kernel": merged.astype(dtype or w.dtype)}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)
