"""Long-prompt generation: ring-attention prefill into a sequence-sharded KV cache, then greedy decoding.

Prefill runs the model once over the whole prompt with ``attention_impl="ring"`` on the mesh's
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
from model.config import LlamaConfig
from model.llama import Llama
from model.params import lm_head_kernel


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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
    hidden, kv = Llama(ring_cfg, mesh).apply({"params": params}, tokens, return_hidden=True, return_kv=True)
    last = hidden[:, length - 1]  # [b, d]
    logits = jnp.einsum("bd,dv->bv", last, lm_head_kernel(params, config).astype(last.dtype))  # [b, v]
    kv_sharding, pos_sharding = _cache_sharding(mesh, b)
    pad = ((0, 0), (0, 0), (0, max_len - t), (0, 0), (0, 0))
    k = jax.lax.with_sharding_constraint(jnp.pad(kv["k"], pad), kv_sharding)
    v = jax.lax.with_sharding_constraint(jnp.pad(kv["v"], pad), kv_sharding)
    slots = jnp.arange(max_len, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.where(slots < length, slots, EMPTY_POSITION), (b, max_len))
    positions = jax.lax.with_sharding_constraint(positions, pos_sharding)
    return logits, {"k": k, "v": v, "positions": positions, "index": jnp.asarray(length, jnp.int32)}


@functools.partial(jax.jit, static_argnames=("config", "mesh", "max_new_tokens", "eos_ids", "pad_id"))
def _decode(params, first_logits, cache, *, config, mesh, max_new_tokens, eos_ids, pad_id):
    """Greedy decoding from the prefill's last logits; the cache keeps its sequence sharding every step."""
    b = first_logits.shape[0]
    model = Llama(config.replace(attention_impl="reference"))  # one query token: dense over the sharded cache
    kv_sharding, pos_sharding = _cache_sharding(mesh, b)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    first = jnp.argmax(first_logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, done, out = state
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)
        cache = {
            **cache,
            "k": jax.lax.with_sharding_constraint(cache["k"], kv_sharding),
            "v": jax.lax.with_sharding_constraint(cache["v"], kv_sharding),
            "positions": jax.lax.with_sharding_constraint(cache["positions"], pos_sharding),
        }
        nxt = jnp.argmax(logits[:, -1].astype(jnp.float32), axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, done | jnp.isin(nxt, eos), out

    state = (jnp.int32(1), first, cache, jnp.isin(first, eos), out)
    return jax.lax.while_loop(cond, body, state)[4]


def ring_generate(
    config: LlamaConfig,
    params,
    prompt: np.ndarray,
    max_new_tokens: int,
    mesh,
    *,
    eos_ids: tuple[int, ...] | None = None,
    pad_id: int | None = None,
) -> np.ndarray:
    """Greedy continuation ``[b, max_new_tokens]`` of ``prompt [b, t]`` with ring prefill on ``mesh``.

    Token-for-token the same as `model.generate` (greedy) on one device, up to float rounding.
    """
    prompt = np.asarray(prompt, np.int32)
    b, t = prompt.shape
    ring = dict(mesh.shape)["sequence"]
    t_pad = _round_up(t, ring)
    max_len = _round_up(t + max_new_tokens, ring)
    eos_ids = tuple(config.eos_token_id) if eos_ids is None else tuple(eos_ids)
    pad_id = (eos_ids[0] if eos_ids else 0) if pad_id is None else pad_id
    tokens = np.zeros((b, t_pad), np.int32)
    tokens[:, :t] = prompt
    from sharding.rules import batch_sharding

    tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
    logits, cache = ring_prefill(params, tokens, config=config, mesh=mesh, length=t, max_len=max_len)
    new = _decode(
        params, logits, cache, config=config, mesh=mesh, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id
    )
    return np.asarray(new)
