"""Blockwise (flash) attention in pure JAX: O(S·d) memory forward and backward, returns the LSE.

Shape letters: the legend in `attention` (b t s n k h here).

The forward scans query chunks × KV chunks with an online softmax in fp32 (`attention.flash`);
its ``jax.custom_vjp`` saves only q, k, v, the output and the LSE and recomputes each chunk's
probabilities in the backward, so no ``[t, s]`` matrix ever exists. Chunk pairs the mask hides
entirely (causal future, other documents, padding) are skipped, not computed. Lengths that are
not multiples of the chunk are padded internally with positions that the mask hides.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attention import instrument
from attention.flash import (
    ChunkConfig,
    finalize,
    flash_backward,
    flash_forward,
    kv_chunks,
    kv_unchunk,
    pad_keys,
    pad_queries,
    q_chunks,
    q_unchunk,
    stat_chunks,
    stat_unchunk,
    token_chunks,
)
from attention.kernels import choose_kernel
from attention.masks import default_positions
from attention.pallas_attention import PallasConfig, pallas_attention


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int = 512,
    skip_masked_chunks: bool = True,
    kernel: str = "jnp",
    counter: instrument.WorkCounter | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Exact grouped-query attention computed chunk by chunk.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` with ``n % k == 0`` (never repeated).
        q_positions / kv_positions: int ``[b, t]`` / ``[b, s]`` (default ``arange``); the mask
            and the chunk skipping come from them, so any token order is correct.
        q_segment_ids / kv_segment_ids: int ``[b, t]`` / ``[b, s]`` or both None.
        causal: hide keys at later positions.
        scale: logit multiplier, default ``h ** -0.5``.
        chunk_size: query and key chunk length (need not divide t or s).
        skip_masked_chunks: False computes and masks every chunk pair (benchmarks only).
        kernel: ``jnp`` (these chunk loops), ``pallas`` (`attention.pallas_attention`, tiles from
            ``chunk_size``) or ``auto`` (`attention.choose_kernel`).
        counter: count the executed chunk (or tile) pairs into it (`attention.instrument`; None: no callbacks).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]``; rows with no visible
        key give zeros and ``-inf``. Differentiable in q, k, v (and through the lse).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("blockwise_attention: give both q_segment_ids and kv_segment_ids, or neither.")
    if chunk_size < 1:
        raise ValueError(f"blockwise_attention: chunk_size must be positive, got {chunk_size}.")
    q_pos = default_positions(b, t) if q_positions is None else q_positions.astype(jnp.int32)
    kv_pos = default_positions(b, s) if kv_positions is None else kv_positions.astype(jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    if choose_kernel(kernel, head_dim=h) != "jnp":
        cfg = PallasConfig.for_chunk(causal, h**-0.5 if scale is None else scale, chunk_size, counter)
        return pallas_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)
    cfg = ChunkConfig(
        causal=causal,
        scale=float(h**-0.5 if scale is None else scale),
        q_chunk=min(chunk_size, t),
        kv_chunk=min(chunk_size, s),
        skip_masked=skip_masked_chunks,
        counter=counter,
    )
    q, q_pos, q_seg = pad_queries(q, q_pos, q_seg, cfg.q_chunk)
    k, v, kv_pos, kv_seg = pad_keys(k, v, kv_pos, kv_seg, cfg.kv_chunk)
    out, lse = _blockwise(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out[:, :t], lse[:, :t]


def _chunked(cfg: ChunkConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Chunk-major copies of the inputs (one transpose each, outside the chunk loops)."""
    kh, cq, ck = k.shape[2], cfg.q_chunk, cfg.kv_chunk
    return (
        q_chunks(q, kh, cq),
        kv_chunks(k, ck),
        kv_chunks(v, ck),
        token_chunks(q_pos, cq),
        token_chunks(kv_pos, ck),
        token_chunks(q_seg, cq),
        token_chunks(kv_seg, ck),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = finalize(flash_forward(*_chunked(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg), cfg))
    return q_unchunk(out, cfg.q_chunk).astype(q.dtype), stat_unchunk(lse, cfg.q_chunk)


def _blockwise_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _blockwise(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    # Residuals are O(S·d): inputs, output and LSE; probabilities are recomputed.
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _blockwise_bwd(cfg, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    kh, cq = k.shape[2], cfg.q_chunk
    # d lse / d logit = p, so an LSE cotangent folds into delta: ds = p * (dp - (delta - d_lse)).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
    # Rows that saw no key have lse -inf and an all-false mask: any finite shift works.
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    dq, dk, dv = flash_backward(
        *_chunked(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg),
        q_chunks(d_out, kh, cq),
        stat_chunks(lse, kh, cq),
        stat_chunks(delta, kh, cq),
        cfg,
    )
    dq = q_unchunk(dq, cq).astype(q.dtype)
    return dq, kv_unchunk(dk).astype(k.dtype), kv_unchunk(dv).astype(v.dtype), None, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
