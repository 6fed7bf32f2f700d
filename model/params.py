"""Parameter creation and inspection: init, logical axis names, the output head."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import LlamaConfig
from model.llama import Llama

Params = dict[str, Any]


def boxed_init_fn(config: LlamaConfig, lora: Any = None):
    """``key -> params`` with boxed (``nn.LogicallyPartitioned``) leaves, for callers that jit a part of the init.

    With ``lora`` the tree also holds the adapters.
    """
    # Parameters do not depend on the attention implementation; ring attention would need a mesh
    # just to trace the init, so initialise through the dense one.
    model = Llama(config.replace(attention_impl="reference"), lora=lora)
    tokens = jnp.zeros((1, 2), jnp.int32)
    return lambda key: model.init(key, tokens)["params"]


def abstract_params(config: LlamaConfig, lora: Any = None) -> Params:
    """The parameter tree as boxed ``jax.ShapeDtypeStruct`` leaves (``nn.LogicallyPartitioned``).

    Each box carries its leaf's logical axis names, so this tree is all `sharding.param_shardings`
    and `sharding.plan_memory` need.

    With ``lora`` (`model.lora.LoraConfig`) the tree also holds its adapters (``lora_a``/``lora_b``).
    """
    return jax.eval_shape(boxed_init_fn(config, lora), jax.random.key(0))


def logical_axes(config: LlamaConfig, lora: Any = None) -> Params:
    """Logical axis names for every parameter, e.g. ``("embed", "heads", "head_dim")``; a tree of tuples."""
    boxed = abstract_params(config, lora)
    return jax.tree.map(lambda x: tuple(x.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_params(config: LlamaConfig, key: jax.Array, out_shardings: Any = None, lora: Any = None) -> Params:
    """Random parameters (normal 0.02, norms at 1), unboxed.

    With ``out_shardings`` (a tree matching the params, e.g.
    ``sharding.param_shardings(abstract_params(config, lora), mesh)``)
    the init runs under ``jax.jit`` so no full-size array ever lands on one device. With ``lora``
    the tree also holds its adapters (A random, B zero: the model still equals the base).
    """
    if out_shardings is None:
        return _jitted_init(config, lora)(key)
    fn = lambda k: nn.meta.unbox(boxed_init_fn(config, lora)(k))
    return jax.jit(fn, out_shardings=out_shardings)(key)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: LlamaConfig, lora: Any = None):
    """One compiled init per config (a fresh ``jax.jit(lambda ...)`` would recompile on every call)."""
    return jax.jit(lambda k: nn.meta.unbox(boxed_init_fn(config, lora)(k)))


def lm_head_kernel(params: Params, config: LlamaConfig) -> jax.Array:
    """The output projection ``[d, v]`` (the embedding transposed when tied)."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def count_params(params: Params) -> int:
    """Number of scalars in a parameter tree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
