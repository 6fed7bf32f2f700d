"""Greedy generation for evals: prefill (ring attention on a mesh) into a KV cache, then a decode loop.

Without a mesh: the model's own cached prefill (``attention_impl`` as configured), then one
token at a time with dense attention over the cache (one query row is cheap dense; the
blockwise kernel's chunk loop costs more than it saves there).

With a mesh whose ``sequence`` axis is N > 1 (ring):

prefill runs the model once over the whole prompt with ``attention_impl="ring"`` on the mesh's
``sequence`` axis (each device holds ``t / N`` tokens of activations) and returns the rotated
K/V of every layer (`model.Llama` ``return_kv=True``). They become a KV cache whose sequence
dimension stays sharded over ``sequence``: each device keeps ``S / N`` slots. Decoding feeds
one token at a time through the cached model path with dense attention; under ``jit`` XLA
partitions the score/softmax/value contractions over the sharded cache (partial results
combined by cross-device reductions), so no device ever holds the whole cache.

Padding: the prompt is right-padded to a multiple of N; the padded slots get
`attention.EMPTY_POSITION` in the cache (so they are masked) and decoding overwrites them
from slot ``t`` on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from attention import EMPTY_POSITION
from model.cache import init_cache
from model.config import LlamaConfig
from model.llama import Llama
from model.params import lm_head_kernel
from sharding.rules import axis_rules


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _constrain_cache(cache: dict, mesh) -> dict:
    """Keep the cache's sequence dimension sharded over ``sequence`` (no-op without a mesh)."""
    if mesh is None:
        return cache
    kv_sharding, pos_sharding = _cache_sharding(mesh, cache["k"].shape[1])
    return {
        **cache,
        "k": jax.lax.with_sharding_constraint(cache["k"], kv_sharding),
        "v": jax.lax.with_sharding_constraint(cache["v"], kv_sharding),
        "positions": jax.lax.with_sharding_constraint(cache["positions"], pos_sharding),
    }


def _cache_sharding(mesh, batch: int) -> tuple[NamedSharding, NamedSharding]:
    """Shardings for cache K/V ``[layers, b, S, k, h]`` and positions ``[b, S]``: S over ``sequence``."""
    axes = dict(mesh.shape)
    batch_axes = tuple(a for a in ("data", "fsdp") if axes.get(a, 1) > 1)
    shards = int(np.prod([axes[a] for a in batch_axes])) if batch_axes else 1
    b_spec = batch_axes if batch_axes and batch % shards == 0 else None
    return NamedSharding(mesh, P(None, b_spec, "sequence", None, None)), NamedSharding(mesh, P(b_spec, "sequence"))


@functools.partial(jax.jit, static_argnames=("config", "mesh", "length", "max_len"))
def ring_prefill(params, tokens, *, config: LlamaConfig, mesh, length: int, max_len: int):
    """Prefill ``tokens [b, T]`` (real prompt ``[:, :length]``, T a multiple of the ring size) with ring attention.

    Returns:
        ``(logits [b, v] at position length − 1, cache)`` with cache K/V ``[layers, b, max_len, k, h]``
        and positions ``[b, max_len]`` sharded over ``sequence``, ``index = length``.
    """
    b, t = tokens.shape
    ring_cfg = config.replace(attention_impl="ring")
    with axis_rules(mesh):
        hidden, kv = Llama(ring_cfg, mesh).apply({"params": params}, tokens, return_hidden=True, return_kv=True)
    last = hidden[:, length - 1]  # [b, d]
    logits = jnp.einsum("bd,dv->bv", last, lm_head_kernel(params, config).astype(last.dtype))  # [b, v]
    pad = ((0, 0), (0, 0), (0, max_len - t), (0, 0), (0, 0))
    slots = jnp.arange(max_len, dtype=jnp.int32)
    cache = {
        "k": jnp.pad(kv["k"], pad),
        "v": jnp.pad(kv["v"], pad),
        "positions": jnp.broadcast_to(jnp.where(slots < length, slots, EMPTY_POSITION), (b, max_len)),
        "index": jnp.asarray(length, jnp.int32),
    }
    return logits, _constrain_cache(cache, mesh)


@functools.partial(jax.jit, static_argnames=("config", "max_len"))
def prefill(params, tokens, *, config: LlamaConfig, max_len: int):
    """One-device prefill of ``tokens [b, t]`` into a fresh cache of ``max_len`` slots: ``(logits [b, v], cache)``."""
    b, _ = tokens.shape
    cache = init_cache(config, b, max_len)
    hidden, cache = Llama(config).apply({"params": params}, tokens, cache=cache, return_hidden=True)
    last = hidden[:, -1]  # [b, d]
    return jnp.einsum("bd,dv->bv", last, lm_head_kernel(params, config).astype(last.dtype)), cache


@functools.partial(jax.jit, static_argnames=("config", "mesh", "max_new_tokens", "eos_ids", "pad_id"))
def decode(params, first_logits, cache, *, config, mesh, max_new_tokens, eos_ids, pad_id):
    """Greedy tokens ``[b, max_new_tokens]`` from the prefill's last logits; a sharded cache stays sharded."""
    b = first_logits.shape[0]
    model = Llama(config.replace(attention_impl="reference"))  # one query token: dense over the (sharded) cache
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    first = jnp.argmax(first_logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out = state
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
        cache = _constrain_cache(cache, mesh)
        nxt = jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, done | jnp.isin(nxt, eos), out

    state = (jnp.int32(1), first, cache, jnp.isin(first, eos), out)
    return jax.lax.while_loop(cond, body, state)[4]


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

    Token-for-token `model.generate` (greedy), up to float rounding; after an EOS a row holds ``pad_id``.
    """
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    eos_ids = tuple(config.eos_token_id) if eos_ids is None else tuple(eos_ids)
    pad_id = (eos_ids[0] if eos_ids else 0) if pad_id is None else pad_id
    ring = 1 if mesh is None else dict(mesh.shape).get("sequence", 1)
    if ring > 1:
        tokens = np.zeros((b, _round_up(t, ring)), np.int32)
        tokens[:, :t] = prompt
        from sharding.rules import batch_sharding

        tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
        max_len = _round_up(t + max_new_tokens, ring)
        logits, cache = ring_prefill(params, tokens, config=config, mesh=mesh, length=t, max_len=max_len)
    else:
        mesh = None
        logits, cache = prefill(params, jnp.asarray(prompt), config=config, max_len=t + max_new_tokens)
    new = decode(
        params, logits, cache, config=config, mesh=mesh, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id
    )
    return np.asarray(new)
