"""Functional KV cache for incremental decoding.

``k``/``v``: ``[layers, b, S, k, h]`` (only the kv heads are cached); ``positions``:
``[b, S]`` int32, with empty slots at `attention.EMPTY_POSITION` so the causal mask hides
them; ``index``: int32 scalar, the next slot to write. `CACHE_AXES` names their dimensions for a
caller's sharding rules (a sequence-sharded cache: ``length`` over the ring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import EMPTY_POSITION
from model.config import LlamaConfig

# Logical axis names of the cache arrays (the rules table maps them to mesh axes).
CACHE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "positions": ("batch", "length"),
}


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: str | None = None) -> dict[str, jax.Array]:
    """An empty cache able to hold ``max_len`` tokens per sequence: K/V ``[layers, batch, max_len, k, h]``."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "positions": jnp.full((batch, max_len), EMPTY_POSITION, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }
