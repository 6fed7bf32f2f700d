"""Flash-style chunk loops shared by blockwise and ring attention (forward and backward).

Shape letters: b batch, t query position, s key position, n query heads, k kv heads,
g = n / k query heads per kv head, h head_dim; a trailing ``q``/``s`` in an einsum is a
query/key position inside one chunk.

The loops take inputs already padded to whole chunks (`pad_queries` / `pad_keys`) and
walk query chunks in an outer ``lax.scan`` and KV chunks in an inner ``lax.fori_loop``
with an online softmax in fp32. A chunk pair that the mask hides entirely (decided from
the chunks' position and segment-id ranges, so any token order works) goes through the
identity branch of a ``lax.cond`` and costs no FLOPs. GQA is native: queries are viewed
as ``[b, t, k, g, h]`` so K/V are never repeated.

Fresh loop carries are made ``varying`` over the same mesh axes as their inputs
(`vary_like`), which ``jax.shard_map(check_vma=True)`` needs when these loops run inside
the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument
from attention.merge import merge_partials

# Position of padded query rows: before every key, so a causal mask hides all keys from them
# and they never raise a chunk's maximum query position (the skip rule stays tight).
Q_PAD = -(2**31)
# Position of padded keys: never visible (checked explicitly, so bidirectional masks hide it too).
KV_PAD = 2**31 - 1


@dataclass(frozen=True)
class ChunkConfig:
    """Static settings of the chunk loops.

    Attributes:
        causal: hide keys with a later position than the query.
        scale: logit multiplier.
        q_chunk / kv_chunk: chunk lengths; inputs must be padded to multiples of them.
        skip_masked: skip fully masked chunk pairs (False computes and masks every pair,
            the classic ring's behaviour, kept for benchmarks).
    """

    causal: bool
    scale: float
    q_chunk: int
    kv_chunk: int
    skip_masked: bool = True


def vary_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """``x`` made varying over every mesh axis the ``refs`` vary over (a no-op value-wise).

    ``zeros_like`` keeps its argument's manual-axis type, so adding scalar zeros derived from
    the refs gives a fresh array (a loop carry, a cond branch) the type the loop body produces.
    """
    for r in refs:
        x = x + jnp.zeros_like(r, shape=(), dtype=x.dtype)
    return x


def pad_queries(q: jax.Array, positions: jax.Array, segments: jax.Array, multiple: int):
    """Pad ``q [b,t,n,h]``, positions and segment ids ``[b,t]`` along t to a multiple of ``multiple``."""
    pad = -q.shape[1] % multiple
    if not pad:
        return q, positions, segments
    return (
        jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))),
        jnp.pad(positions, ((0, 0), (0, pad)), constant_values=Q_PAD),
        # Edge padding keeps the chunk's segment range, so the skip rule is unaffected.
        jnp.pad(segments, ((0, 0), (0, pad)), mode="edge"),
    )


def pad_keys(k: jax.Array, v: jax.Array, positions: jax.Array, segments: jax.Array, multiple: int):
    """Pad ``k, v [b,s,k,h]`` and their positions/segment ids along s to a multiple of ``multiple``."""
    pad = -k.shape[1] % multiple
    if not pad:
        return k, v, positions, segments
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    return (
        jnp.pad(k, widths),
        jnp.pad(v, widths),
        jnp.pad(positions, ((0, 0), (0, pad)), constant_values=KV_PAD),
        jnp.pad(segments, ((0, 0), (0, pad)), mode="edge"),
    )


def chunk_mask(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool) -> jax.Array:
    """Bool ``[b, tq, sk]``: same segment, key not padding and (if causal) not in the future."""
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_pos != KV_PAD)[:, None, :]
    if causal:
        mask = mask & (q_pos[:, :, None] >= kv_pos[:, None, :])
    return mask


def block_is_masked(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool):
    """Scalar bool: every (query, key) pair of these blocks is masked, for every batch row.

    Uses only per-row ranges: keys all padding, causal keys all later than the latest query,
    or disjoint segment-id ranges. Conservative (may say False for a masked block), never wrong.
    """
    kv_min = jnp.min(kv_pos, axis=1)  # [b]; padding is KV_PAD, the largest int32
    masked = kv_min == KV_PAD
    if causal:
        masked = masked | (kv_min > jnp.max(q_pos, axis=1))
    disjoint = (jnp.max(q_seg, axis=1) < jnp.min(kv_seg, axis=1)) | (jnp.max(kv_seg, axis=1) < jnp.min(q_seg, axis=1))
    return jnp.all(masked | disjoint)


def _maybe_skip(cfg: ChunkConfig, masked, compute, carry):
    """``compute(carry)`` unless the block is masked and skipping is on (then ``carry``, no FLOPs)."""
    if not cfg.skip_masked:
        return compute(carry)
    return lax.cond(masked, lambda c: c, compute, carry)


def flash_forward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg: ChunkConfig, device_index=None, out=None, lse=None, active=None
):
    """Online-softmax attention over padded inputs, optionally merged into earlier partial results.

    Args:
        q: ``[b, t, n, h]`` with ``t % cfg.q_chunk == 0``; k, v: ``[b, s, k, h]`` with
            ``s % cfg.kv_chunk == 0``; positions / segment ids int32 ``[b, t]`` / ``[b, s]``.
        cfg: chunking and masking settings.
        device_index: ring position for `instrument` counts (None off a ring).
        out, lse: fp32 ``[b, t, n, h]`` / ``[b, t, n]`` results over other keys (a ring's earlier
            hops) to merge into, chunk by chunk in place (no second full-size buffer); None: none.
        active: traced bool; False runs zero iterations and returns ``out, lse`` untouched (a
            skipped ring hop). A zero-trip loop rather than a ``cond``, whose branches would
            need a second copy of the full-size carries.

    Returns:
        out fp32 ``[b, t, n, h]`` (zeros for rows with no visible key) and lse fp32 ``[b, t, n]``
        (``-inf`` for those rows).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g, cq, ck = n // kh, cfg.q_chunk, cfg.kv_chunk
    q5 = q.reshape(b, t, kh, g, h)
    merge = out is not None
    if not merge:
        out = vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, q_pos, kv_pos, q_seg, kv_seg)
        lse = jnp.full_like(out, -jnp.inf, shape=q.shape[:3])

    def q_step(i, carry):
        out, lse = carry
        qi = lax.dynamic_slice_in_dim(q5, i * cq, cq, axis=1)  # [b, cq, k, g, h]
        qpi = lax.dynamic_slice_in_dim(q_pos, i * cq, cq, axis=1)
        qsi = lax.dynamic_slice_in_dim(q_seg, i * cq, cq, axis=1)
        acc0 = vary_like(jnp.zeros((b, kh, g, cq, h), jnp.float32), out, qi, k, v, qpi, kv_pos, qsi, kv_seg)
        m0 = jnp.full_like(acc0, -jnp.inf, shape=(b, kh, g, cq))  # running row max
        l0 = jnp.zeros_like(m0)  # running softmax denominator

        def kv_step(j, carry):
            kj = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=1)  # [b, ck, k, h]
            vj = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=1)
            kpj = lax.dynamic_slice_in_dim(kv_pos, j * ck, ck, axis=1)
            ksj = lax.dynamic_slice_in_dim(kv_seg, j * ck, ck, axis=1)

            def compute(carry):
                acc, m, denom = carry
                instrument.record("chunk_fwd", device_index)
                s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * cfg.scale
                mask = chunk_mask(qpi, kpj, qsi, ksj, cfg.causal)[:, None, None]  # [b, 1, 1, cq, ck]
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                # Rows with nothing visible yet keep max -inf; shift by 0 so exp gives 0, not NaN.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.exp(m - m_safe)
                p = jnp.exp(s - m_safe[..., None])  # [b, k, g, cq, ck]
                pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
                return alpha[..., None] * acc + pv, m_new, alpha * denom + jnp.sum(p, axis=-1)

            return _maybe_skip(cfg, block_is_masked(qpi, kpj, qsi, ksj, cfg.causal), compute, carry)

        acc, m, denom = lax.fori_loop(0, k.shape[1] // ck, kv_step, (acc0, m0, l0))
        seen = denom > 0
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)  # [b, k, g, cq]
        out_i = acc / jnp.where(seen, denom, 1.0)[..., None]
        out_i = out_i.transpose(0, 3, 1, 2, 4).reshape(b, cq, n, h)
        lse_i = lse_i.transpose(0, 3, 1, 2).reshape(b, cq, n)
        if merge:
            prev_out = lax.dynamic_slice_in_dim(out, i * cq, cq, axis=1)
            prev_lse = lax.dynamic_slice_in_dim(lse, i * cq, cq, axis=1)
            out_i, lse_i = merge_partials(prev_out, prev_lse, out_i, lse_i)
        out = lax.dynamic_update_slice_in_dim(out, out_i, i * cq, axis=1)
        return out, lax.dynamic_update_slice_in_dim(lse, lse_i, i * cq, axis=1)

    return lax.fori_loop(0, _trips(t // cq, active), q_step, (out, lse))


def flash_backward(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    do,
    lse,
    delta,
    cfg: ChunkConfig,
    device_index=None,
    dq=None,
    dk=None,
    dv=None,
    active=None,
):
    """Gradients of `flash_forward` recomputed chunk by chunk from the saved (global) LSE.

    Args:
        q, k, v, positions, segment ids, cfg: as for `flash_forward`.
        do: output cotangent ``[b, t, n, h]``.
        lse: fp32 ``[b, t, n]`` log-sum-exp of the *complete* attention row (for the ring:
            over all hops), so ``p = exp(s - lse)`` are the final probabilities.
        delta: fp32 ``[b, t, n]``: ``sum(do * out, -1) - dlse`` with the final output.
        dq, dk, dv: fp32 accumulators (``[b, t, n, h]``, ``[b, s, k, h]``) to add into in place
            (zeros when None).
        active: traced bool; False skips all work (see `flash_forward`).

    Returns:
        dq, dk, dv in fp32, including the accumulators.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    g, cq, ck = n // kh, cfg.q_chunk, cfg.kv_chunk
    q5, do5 = q.reshape(b, t, kh, g, h), do.reshape(b, t, kh, g, h)
    # Rows that saw no key have lse -inf and an all-false mask: any finite shift works.
    lse4 = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, t, kh, g)
    delta4 = delta.reshape(b, t, kh, g)
    if dq is None:
        dq = vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, do, q_pos, kv_pos, q_seg, kv_seg, lse, delta)
    if dk is None:
        dk, dv = jnp.zeros_like(dq, shape=k.shape), jnp.zeros_like(dq, shape=v.shape)

    def q_step(i, carry):
        dq, dk, dv = carry
        qi = lax.dynamic_slice_in_dim(q5, i * cq, cq, axis=1)  # [b, cq, k, g, h]
        doi = lax.dynamic_slice_in_dim(do5, i * cq, cq, axis=1)
        lse_i = lax.dynamic_slice_in_dim(lse4, i * cq, cq, axis=1).transpose(0, 2, 3, 1)  # [b, k, g, cq]
        delta_i = lax.dynamic_slice_in_dim(delta4, i * cq, cq, axis=1).transpose(0, 2, 3, 1)
        qpi = lax.dynamic_slice_in_dim(q_pos, i * cq, cq, axis=1)
        qsi = lax.dynamic_slice_in_dim(q_seg, i * cq, cq, axis=1)
        # This chunk's dq accumulates on top of what earlier calls (ring hops) left there.
        dq0 = vary_like(lax.dynamic_slice_in_dim(dq, i * cq, cq, axis=1).reshape(qi.shape), dk, dv, qi, doi)

        def kv_step(j, inner):
            dqi, dk, dv = inner
            kj = lax.dynamic_slice_in_dim(k, j * ck, ck, axis=1)  # [b, ck, k, h]
            vj = lax.dynamic_slice_in_dim(v, j * ck, ck, axis=1)
            kpj = lax.dynamic_slice_in_dim(kv_pos, j * ck, ck, axis=1)
            ksj = lax.dynamic_slice_in_dim(kv_seg, j * ck, ck, axis=1)

            def compute(dqi):
                instrument.record("chunk_bwd", device_index)
                s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * cfg.scale
                mask = chunk_mask(qpi, kpj, qsi, ksj, cfg.causal)[:, None, None]
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)  # [b, k, g, cq, ck]
                dv_j = jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None])  # d(loss)/d(logit), before the scale
                dqi = dqi + cfg.scale * jnp.einsum(
                    "bkgqs,bskh->bqkgh", ds.astype(k.dtype), kj, preferred_element_type=jnp.float32
                )
                dk_j = cfg.scale * jnp.einsum(
                    "bkgqs,bqkgh->bskh", ds.astype(q.dtype), qi, preferred_element_type=jnp.float32
                )
                return dqi, dk_j, dv_j

            def skip(dqi):
                zeros = vary_like(jnp.zeros(kj.shape, jnp.float32), dqi, kj, vj, kpj, ksj, lse_i, delta_i)
                return dqi, zeros, zeros

            # The cond carries only chunk-sized values; the full dK/dV stay in the loop carry.
            if cfg.skip_masked:
                masked = block_is_masked(qpi, kpj, qsi, ksj, cfg.causal)
                dqi, dk_j, dv_j = lax.cond(masked, skip, compute, dqi)
            else:
                dqi, dk_j, dv_j = compute(dqi)
            dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, j * ck, ck, 1) + dk_j, j * ck, 1)
            dv = lax.dynamic_update_slice_in_dim(dv, lax.dynamic_slice_in_dim(dv, j * ck, ck, 1) + dv_j, j * ck, 1)
            return dqi, dk, dv

        dqi, dk, dv = lax.fori_loop(0, k.shape[1] // ck, kv_step, (dq0, dk, dv))
        return lax.dynamic_update_slice_in_dim(dq, dqi.reshape(b, cq, n, h), i * cq, axis=1), dk, dv

    return lax.fori_loop(0, _trips(t // cq, active), q_step, (dq, dk, dv))


def _trips(count: int, active):
    """Loop trip count: ``count``, or 0 when the traced ``active`` is False."""
    return count if active is None else jnp.where(active, count, 0)
