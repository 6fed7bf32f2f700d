"""Blockwise (flash) attention on one device: O(S·d) memory forward and backward, returns the LSE.

Shape letters: the legend in `attention` (b t s n k h here).

The driver's ``local`` mode (`attention.driver`) on a local kernel (`attention.local_kernels`):
an online softmax in fp32 over key chunks or tiles, a ``jax.custom_vjp`` that saves only q, k,
v, the output and the LSE and recomputes each chunk's probabilities in the backward, so no
``[t, s]`` matrix ever exists. Chunk pairs the mask hides entirely (causal future, other
documents, padding) are skipped, not computed. Lengths that are not multiples of the chunk are
padded internally with positions that the mask hides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import instrument
from attention.driver import DriverConfig, attend
from attention.kernels import AttentionError, choose_kernel
from attention.local_kernels import KernelSpec
from attention.masks import default_positions


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
    skip_masked: bool = True,
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
        skip_masked: False computes and masks every chunk pair (benchmarks only).
        kernel: a local kernel (`attention.choose_kernel`: ``jnp``, ``pallas``, ``auto``, ...).
        counter: count the executed chunk (or tile) pairs into it (`attention.instrument`; None: no callbacks).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]``; rows with no visible
        key give zeros and ``-inf``. Differentiable in q, k, v (and through the lse).
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise AttentionError("blockwise_attention: give both q_segment_ids and kv_segment_ids, or neither.")
    if chunk_size < 1:
        raise AttentionError(f"blockwise_attention: chunk_size must be positive, got {chunk_size}.")
    q_pos = default_positions(b, t) if q_positions is None else q_positions.astype(jnp.int32)
    kv_pos = default_positions(b, s) if kv_positions is None else kv_positions.astype(jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    spec = KernelSpec(causal, float(h**-0.5 if scale is None else scale), chunk_size, skip_masked, counter)
    cfg = DriverConfig(choose_kernel(kernel, head_dim=h, dtype=q.dtype), spec, "local")
    return attend(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
