"""The one decoder: prefill into a KV cache, then a jit-compiled decode loop (greedy, temperature, top-p).

`generate` is one compiled program per (config, batch, prompt length, max_new_tokens, greedy
or not, mesh): the prefill and the one-token decode step are each traced once; temperature,
top-p, eos ids and the pad id are traced, so new settings reuse the program.

Prefill, two ways:

- **one device** (no mesh, or a mesh without a ring): the model's cached path over the prompt,
  ``attention_impl`` as configured (a ring config runs as ``auto``: the cache path has no mesh).
- **ring** (a mesh whose ``sequence`` axis is N > 1): the model runs once over the prompt with
  ring attention (each device holds ``t / N`` tokens of activations) and returns the rotated K/V
  of every layer (`model.Llama` ``return_kv=True``); they become the KV cache, whose sequence
  dimension stays sharded over ``sequence`` when the caller gives ``cache_sharding`` (each
  device keeps ``S / N`` slots). The prompt is right-padded to a multiple of N; padded slots
  hold `attention.EMPTY_POSITION` (masked) and decoding overwrites them from slot ``t`` on.

Decoding feeds one token at a time through the cached path with dense attention: one query
row is cheap dense (a blockwise kernel's chunk loop costs more than it saves there), and on a
sharded cache XLA partitions the score/softmax/value contractions over the slots (partial
results combined by cross-device reductions), so no device ever holds the whole cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention import EMPTY_POSITION
from model.cache import init_cache
from model.config import LlamaConfig
from model.llama import Llama
from model.params import lm_head_kernel

# Stop ids travel as a fixed-size array padded with -1 (never a token), so new eos sets reuse the program.
_EOS_SLOTS = 8


def sample_token(logits_bv: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Next token ``[b]`` from last-position logits.

    A Python ``temperature == 0`` is greedy (argmax). Otherwise nucleus sampling at
    ``temperature`` keeping the smallest set of most likely tokens whose mass reaches
    ``top_p`` (transformers' ``TopPLogitsWarper`` rule); both may be traced scalars, so new
    sampling settings reuse the compiled program.
    """
    logits_bv = logits_bv.astype(jnp.float32)
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / temperature
    sorted_logits = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token survives when the mass of the tokens before it is below top_p (the first always does).
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv >= cutoff, logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def ring_size(mesh) -> int:
    """Devices on the mesh's ``sequence`` axis (1 without a mesh): > 1 means ring prefill."""
    return 1 if mesh is None else dict(mesh.shape).get("sequence", 1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cache_len(prompt_len: int, max_new_tokens: int, mesh=None) -> int:
    """Cache slots `generate` allocates: prompt + new tokens, rounded up to a multiple of the ring size."""
    return _round_up(prompt_len + max_new_tokens, ring_size(mesh))


def _constrain_cache(cache: dict, cache_sharding) -> dict:
    """Pin K/V ``[layers, b, S, k, h]`` and positions ``[b, S]`` to ``cache_sharding = (kv, positions)``."""
    if cache_sharding is None:
        return cache
    kv, pos = cache_sharding
    wsc = jax.lax.with_sharding_constraint
    return {**cache, "k": wsc(cache["k"], kv), "v": wsc(cache["v"], kv), "positions": wsc(cache["positions"], pos)}


def _head(hidden_bd: jax.Array, params, config: LlamaConfig) -> jax.Array:
    # Only the last position needs logits: a long prompt's full [b, t, v] logits would not fit.
    return jnp.einsum("bd,dv->bv", hidden_bd, lm_head_kernel(params, config).astype(hidden_bd.dtype))  # [b, v]


def _prefill(params, tokens, *, config: LlamaConfig, max_len: int, mesh=None, cache_sharding=None):
    """``tokens [b, t]`` → ``(last-position logits [b, v], cache of max_len slots with index t)``."""
    b, t = tokens.shape
    n = ring_size(mesh)
    if n == 1:
        if config.attention_impl == "ring":  # no ring here: the cache path runs a ring config like "auto"
            config = config.replace(attention_impl="auto")
        cache = init_cache(config, b, max_len)
        hidden, cache = Llama(config).apply({"params": params}, tokens, cache=cache, return_hidden=True)
        return _head(hidden[:, -1], params, config), cache
    if max_len % n:
        raise ValueError(f"a ring prefill needs a cache length divisible by the ring size {n}, got {max_len}.")
    padded = jnp.pad(tokens, ((0, 0), (0, _round_up(t, n) - t)))  # every ring shard gets the same tokens
    ring_cfg = config.replace(attention_impl="ring")
    hidden, kv = Llama(ring_cfg, mesh).apply({"params": params}, padded, return_hidden=True, return_kv=True)
    pad = ((0, 0), (0, 0), (0, max_len - padded.shape[1]), (0, 0), (0, 0))
    slots = jnp.arange(max_len, dtype=jnp.int32)
    cache = {
        "k": jnp.pad(kv["k"], pad),
        "v": jnp.pad(kv["v"], pad),
        "positions": jnp.broadcast_to(jnp.where(slots < t, slots, EMPTY_POSITION), (b, max_len)),
        "index": jnp.asarray(t, jnp.int32),
    }
    return _head(hidden[:, t - 1], params, config), _constrain_cache(cache, cache_sharding)


def _decode(params, first_logits, cache, key, temperature, top_p, eos, pad_id, *, config, max_new_tokens, greedy,
            cache_sharding=None):  # fmt: skip
    """Tokens ``[b, max_new_tokens]`` from the prefill's last logits; rows that hit an eos id pad with ``pad_id``."""
    b = first_logits.shape[0]
    model = Llama(config.replace(attention_impl="reference"))  # one query token: dense over the (sharded) cache
    temperature = 0 if greedy else temperature
    key, sub = jax.random.split(key)
    first = sample_token(first_logits, sub, temperature, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)  # stop early once every row has finished

    def body(state):
        i, tok, cache, done, out, key = state
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)  # decode: one token
        cache = _constrain_cache(cache, cache_sharding)
        key, sub = jax.random.split(key)
        nxt = sample_token(logits[:, -1], sub, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, done | jnp.isin(nxt, eos), out, key

    state = (jnp.int32(1), first, cache, jnp.isin(first, eos), out, key)
    return jax.lax.while_loop(cond, body, state)[4]


# The two halves on their own, for benchmarks that time them apart (benchmarks/prefill_decode.py).
prefill = jax.jit(_prefill, static_argnames=("config", "max_len", "mesh", "cache_sharding"))
decode = jax.jit(_decode, static_argnames=("config", "max_new_tokens", "greedy", "cache_sharding"))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "mesh", "cache_sharding"))
def _generate(params, prompt, key, temperature, top_p, eos, pad_id, *, config, max_new_tokens, greedy, mesh=None,
              cache_sharding=None):  # fmt: skip
    max_len = cache_len(prompt.shape[1], max_new_tokens, mesh)
    logits, cache = _prefill(params, prompt, config=config, max_len=max_len, mesh=mesh, cache_sharding=cache_sharding)
    out = _decode(params, logits, cache, key, temperature, top_p, eos, pad_id, config=config,
                  max_new_tokens=max_new_tokens, greedy=greedy, cache_sharding=cache_sharding)  # fmt: skip
    return jnp.concatenate([prompt, out], axis=1)


def stop_ids(config: LlamaConfig, eos_ids: tuple[int, ...] | None = None) -> jax.Array:
    """The eos ids (default: the config's) as the fixed-size int32 array the decode loop takes."""
    eos_ids = tuple(config.eos_token_id) if eos_ids is None else tuple(eos_ids)
    eos = np.full(max(_EOS_SLOTS, len(eos_ids)), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    return jnp.asarray(eos)


def generate(
    config: LlamaConfig,
    params,
    prompt: jax.Array,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
    mesh=None,
    cache_sharding=None,
) -> jax.Array:
    """Continue ``prompt [b, t]`` by up to ``max_new_tokens``; returns ``[b, t + max_new_tokens]``.

    Greedy when ``temperature == 0`` (token-for-token equal to transformers'
    ``generate(do_sample=False)``). A sequence stops at any of ``eos_ids`` (default: the
    config's), after which it is filled with ``pad_id`` (default: the first eos id, or 0).

    Args:
        mesh: a mesh whose ``sequence`` axis is > 1 prefills with ring attention (params placed on
            it, e.g. `sharding.shard_params`); otherwise ignored.
        cache_sharding: ``(kv, positions)`` shardings for the cache's K/V ``[layers, b, S, k, h]``
            and positions ``[b, S]`` with ``S = cache_len(t, max_new_tokens, mesh)`` (the caller
            maps `model.cache.CACHE_AXES` through its rules table); None leaves them to XLA.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1.")
    eos_ids = tuple(config.eos_token_id) if eos_ids is None else tuple(eos_ids)
    pad_id = (eos_ids[0] if eos_ids else 0) if pad_id is None else pad_id
    key = jax.random.key(0) if key is None else key
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}.")
    if ring_size(mesh) == 1:
        mesh, cache_sharding = None, None  # one compiled program for every mesh without a ring
        if config.attention_impl == "ring":  # the cache path has no mesh: a ring config decodes like "auto"
            config = config.replace(attention_impl="auto")
    return _generate(
        params,
        jnp.asarray(prompt, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        stop_ids(config, eos_ids),
        jnp.int32(pad_id),
        config=config,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
        mesh=mesh,
        cache_sharding=cache_sharding,
    )
