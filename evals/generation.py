"""Greedy generation for evals through the one decoder, `model.generate`, with the cache sharded by the rules table.

On a mesh whose ``sequence`` axis is > 1, `model.generate` prefills with ring attention into a
KV cache; here its slots are pinned to the rules table's activation shardings (`length` over
``sequence``, so each device keeps ``S / N`` slots; batch over data/fsdp where it divides), and
decoding runs over the sharded cache. Without a ring everything runs on one device.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import NamedSharding

import model
from model.cache import CACHE_AXES
from model.config import LlamaConfig
from model.generate import cache_len, ring_size
from sharding.rules import ACTIVATION_RULES, axis_rules, logical_to_spec


def cache_sharding(config: LlamaConfig, mesh, batch: int, max_len: int) -> tuple[NamedSharding, NamedSharding]:
    """``(kv, positions)`` shardings of a ``[layers, batch, max_len, k, h]`` cache, from `model.cache.CACHE_AXES`."""
    kv_shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    kv = logical_to_spec(CACHE_AXES["k"], ACTIVATION_RULES, mesh, kv_shape)
    pos = logical_to_spec(CACHE_AXES["positions"], ACTIVATION_RULES, mesh, (batch, max_len))
    return NamedSharding(mesh, kv), NamedSharding(mesh, pos)


def greedy_generate(
    config: LlamaConfig,
    params,
    prompt: np.ndarray,
    max_new_tokens: int,
    mesh=None,
    *,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """Greedy continuation ``[b, max_new_tokens]`` of ``prompt [b, t]``; ring prefill when ``mesh`` has a ring.

    Token-for-token `model.generate` on one device, up to float rounding; after an EOS a row holds ``pad_id``.
    """
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    shardings = None
    if ring_size(mesh) > 1:
        shardings = cache_sharding(config, mesh, b, cache_len(t, max_new_tokens, mesh))
    with axis_rules(mesh):  # the ring prefill traces the model on the mesh
        out = model.generate(
            config, params, prompt, max_new_tokens, eos_ids=eos_ids, pad_id=pad_id, mesh=mesh, cache_sharding=shardings
        )
    return np.asarray(out)[:, t:]
