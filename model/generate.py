"""Jit-compiled autoregressive generation with the KV cache: greedy, temperature and top-p.

The whole loop (prefill + ``lax.while_loop`` decode) is one compiled program per
(config, batch, prompt length, max_new_tokens, greedy or not): the prefill and the one-token
decode step are each traced once; temperature, top-p, eos ids and the pad id are traced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.cache import init_cache
from model.config import LlamaConfig
from model.llama import Llama
from model.params import lm_head_kernel


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


# Stop ids travel as a fixed-size array padded with -1 (never a token), so new eos sets reuse the program.
_EOS_SLOTS = 8


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy"))
def _generate(params, prompt, key, temperature, top_p, eos, pad_id, *, config, max_new_tokens, greedy):
    b, t = prompt.shape
    model = Llama(config)
    temperature = 0 if greedy else temperature
    cache = init_cache(config, b, t + max_new_tokens)
    # Prefill: one pass over the prompt. Only the last position needs logits; a long prompt's
    # full [b, t, vocab] logits would not fit (1M tokens x 128K vocab).
    hidden, cache = model.apply({"params": params}, prompt, cache=cache, return_hidden=True)
    dt = jnp.dtype(config.dtype)
    last_bv = jnp.einsum("bd,dv->bv", hidden[:, -1], lm_head_kernel(params, config).astype(dt))  # [b, v]
    key, sub = jax.random.split(key)
    first = sample_token(last_bv, sub, temperature, top_p)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)  # stop early once every row has finished

    def body(state):
        i, tok, cache, done, out, key = state
        logits, cache = model.apply({"params": params}, tok[:, None], cache=cache)  # decode: one token
        key, sub = jax.random.split(key)
        nxt = sample_token(logits[:, -1], sub, temperature, top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, done | jnp.isin(nxt, eos), out, key

    state = (jnp.int32(1), first, cache, done, out, key)
    out = jax.lax.while_loop(cond, body, state)[4]
    return jnp.concatenate([prompt.astype(jnp.int32), out], axis=1)


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
) -> jax.Array:
    """Continue ``prompt [b, t]`` by up to ``max_new_tokens``; returns ``[b, t + max_new_tokens]``.

    Greedy when ``temperature == 0`` (token-for-token equal to transformers'
    ``generate(do_sample=False)``). A sequence stops at any of ``eos_ids`` (default: the
    config's), after which it is filled with ``pad_id`` (default: the first eos id, or 0).
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1.")
    eos_ids = tuple(config.eos_token_id) if eos_ids is None else tuple(eos_ids)
    pad_id = (eos_ids[0] if eos_ids else 0) if pad_id is None else pad_id
    key = jax.random.key(0) if key is None else key
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}.")
    if config.attention_impl == "ring":
        # Decoding here runs unsharded (the cache path has no mesh); ring configs decode like "auto".
        config = config.replace(attention_impl="auto")
    eos = np.full(max(_EOS_SLOTS, len(eos_ids)), -1, np.int32)
    eos[: len(eos_ids)] = eos_ids
    return _generate(
        params,
        jnp.asarray(prompt, jnp.int32),
        key,
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.asarray(eos),
        jnp.int32(pad_id),
        config=config,
        max_new_tokens=max_new_tokens,
        greedy=temperature == 0,
    )
