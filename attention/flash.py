"""Flash-style chunk loops shared by blockwise and ring attention (forward and backward).

Shape letters: the legend in `attention` (b t s n k g h c r here).

The loops work on a *chunk-major* layout made once per call (`q_chunks`, `kv_chunks`,
`token_chunks`): queries ``[t/c, b, k, g·c, h]``, keys/values ``[s/c, b, k, c, h]``. A chunk is
then one contiguous slice of the leading axis, and every matmul is a plain batched ``[r, h] ×
[h, c]`` product over ``(b, k)``: GQA stays native (K/V never repeated) and XLA needs no
per-chunk transposes. Query chunks run in an outer loop, KV chunks in an inner one, with an
online softmax in fp32.

Each chunk pair is classified from its position and segment-id ranges (so any token order
works) as hidden (never visited), fully visible (no mask at all) or partly visible (masked).
The classification is one small table per call (`_schedule`): per query chunk, the visible KV
chunks in order, fully visible first; two plain loops then run over them, with no per-pair
branch. Full-size accumulators are updated in place with dynamic-update-slices of the leading
axis. The forward carries the unnormalised state ``(acc, m, l)`` so a ring merges hops by simply
continuing it (`finalize` normalises once at the end).

Fresh loop carries are made ``varying`` over the same mesh axes as their inputs
(`vary_like`), which ``jax.shard_map(check_vma=True)`` needs when these loops run inside
the ring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument

# Position of padded query rows: before every key, so a causal mask hides all keys from them
# and they never raise a chunk's maximum query position (the skip rule stays tight).
Q_PAD = -(2**31)
# Position of padded keys: never visible (checked explicitly, so bidirectional masks hide it too).
KV_PAD = 2**31 - 1
# Running-max start: finite, so exp(m_old - m_new) never sees inf - inf, and below any real logit.
M_INIT = float(jnp.finfo(jnp.float32).min)
HIDDEN, FULL, PARTIAL = 0, 1, 2  # chunk-pair kinds


@dataclass(frozen=True)
class ChunkConfig:
    """Static settings of the chunk loops.

    Attributes:
        causal: hide keys with a later position than the query.
        scale: logit multiplier.
        q_chunk / kv_chunk: chunk lengths; inputs must be padded to multiples of them.
        skip_masked: skip fully masked chunk pairs and use the mask-free path for fully
            visible ones (False computes and masks every pair, the classic ring's behaviour,
            kept for benchmarks).
        counter: count the executed chunk pairs (and ring hops) into it (`attention.instrument`);
            None emits no callbacks. Part of the static config, so counted and uncounted traces
            are different jit cache entries.
    """

    causal: bool
    scale: float
    q_chunk: int
    kv_chunk: int
    skip_masked: bool = True
    counter: instrument.WorkCounter | None = None


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


def q_chunks(x: jax.Array, kv_heads: int, chunk: int) -> jax.Array:
    """``[b, t, n, h]`` → chunk-major ``[t/c, b, k, g·c, h]`` (rows of one kv head's query group)."""
    b, t, n, h = x.shape
    g = n // kv_heads
    x = x.reshape(b, t // chunk, chunk, kv_heads, g, h).transpose(1, 0, 3, 4, 2, 5)
    return x.reshape(t // chunk, b, kv_heads, g * chunk, h)


def q_unchunk(x: jax.Array, chunk: int) -> jax.Array:
    """Inverse of `q_chunks`: ``[t/c, b, k, g·c, h]`` → ``[b, t, n, h]``."""
    nc, b, kh, r, h = x.shape
    g = r // chunk
    return x.reshape(nc, b, kh, g, chunk, h).transpose(1, 0, 4, 2, 3, 5).reshape(b, nc * chunk, kh * g, h)


def stat_chunks(x: jax.Array, kv_heads: int, chunk: int) -> jax.Array:
    """Per-query-head statistics ``[b, t, n]`` → ``[t/c, b, k, g·c]``."""
    return q_chunks(x[..., None], kv_heads, chunk)[..., 0]


def stat_unchunk(x: jax.Array, chunk: int) -> jax.Array:
    """Inverse of `stat_chunks`."""
    return q_unchunk(x[..., None], chunk)[..., 0]


def kv_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``[b, s, k, h]`` → chunk-major ``[s/c, b, k, c, h]``."""
    b, s, kh, h = x.shape
    return x.reshape(b, s // chunk, chunk, kh, h).transpose(1, 0, 3, 2, 4)


def kv_unchunk(x: jax.Array) -> jax.Array:
    """Inverse of `kv_chunks`."""
    nc, b, kh, c, h = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, nc * c, kh, h)


def token_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """Positions / segment ids ``[b, t]`` → ``[t/c, b, c]``."""
    b, t = x.shape
    return x.reshape(b, t // chunk, chunk).transpose(1, 0, 2)


def chunk_mask(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool) -> jax.Array:
    """Bool ``[b, tq, sk]``: same segment, key not padding and (if causal) not in the future."""
    mask = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_pos != KV_PAD)[:, None, :]
    if causal:
        mask = mask & (q_pos[:, :, None] >= kv_pos[:, None, :])
    return mask


class _Ranges(NamedTuple):
    """Per-row ranges of a block of tokens (arrays ``[..., b]``), all the skip rules need."""

    pos_min: jax.Array
    pos_max: jax.Array  # over non-padding keys (KV_PAD excluded); queries: over all
    seg_min: jax.Array
    seg_max: jax.Array
    padded: jax.Array  # any KV_PAD key


def _ranges(pos: jax.Array, seg: jax.Array, axes) -> _Ranges:
    real = jnp.where(pos == KV_PAD, jnp.iinfo(jnp.int32).min, pos)
    return _Ranges(
        jnp.min(pos, axes), jnp.max(real, axes), jnp.min(seg, axes), jnp.max(seg, axes), jnp.any(pos == KV_PAD, axes)
    )


def _hidden(qr: _Ranges, kr: _Ranges, causal: bool) -> jax.Array:
    """Every (query, key) pair masked, for every batch row (conservative: False may still be masked)."""
    masked = kr.pos_min == KV_PAD  # all keys padding
    if causal:
        masked = masked | (kr.pos_min > qr.pos_max)
    disjoint = (qr.seg_max < kr.seg_min) | (kr.seg_max < qr.seg_min)
    return jnp.all(masked | disjoint)


def _visible(qr: _Ranges, kr: _Ranges, causal: bool) -> jax.Array:
    """Every (query, key) pair visible for every batch row: one shared segment, no padding, no future key."""
    seen = ~kr.padded & (qr.seg_min == qr.seg_max) & (kr.seg_min == kr.seg_max) & (qr.seg_min == kr.seg_min)
    if causal:
        seen = seen & (kr.pos_max <= qr.pos_min)
    return jnp.all(seen)


def block_is_masked(q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, causal: bool):
    """Scalar bool: every (query, key) pair of these blocks is masked, for every batch row.

    Takes token arrays ``[b, t]`` or chunk-major ``[t/c, b, c]``. Uses only per-row ranges:
    keys all padding, causal keys all later than the latest query, or disjoint segment-id
    ranges. Conservative (may say False for a masked block), never wrong.
    """
    axes = (1,) if q_pos.ndim == 2 else (0, 2)
    return _hidden(_ranges(q_pos, q_seg, axes), _ranges(kv_pos, kv_seg, axes), causal)


def _pair_kind(cfg: ChunkConfig, qr: _Ranges, kr: _Ranges) -> jax.Array | int:
    if not cfg.skip_masked:
        return PARTIAL
    kind = jnp.where(_visible(qr, kr, cfg.causal), FULL, PARTIAL)
    return jnp.where(_hidden(qr, kr, cfg.causal), HIDDEN, kind).astype(jnp.int32)


class _Schedule(NamedTuple):
    """Per query chunk, the KV chunks to visit: fully visible ones first, then partly visible ones.

    ``order [t/c, s/c]`` lists KV chunk indices by kind (hidden ones last, never visited);
    ``full`` and ``partial`` ``[t/c]`` count them. Two plain loops then run per query chunk, one
    mask-free and one masked, with no per-pair branch: a ``lax.switch`` there made XLA copy the
    loop carry on every pair, and hidden pairs still cost an iteration.
    """

    order: jax.Array
    full: jax.Array
    partial: jax.Array


def _schedule(cfg: ChunkConfig, q_ranges: _Ranges, k_ranges: _Ranges, nk: int) -> _Schedule:
    nq = q_ranges.pos_min.shape[0]
    if not cfg.skip_masked:  # every pair computed and masked (the classic ring, for benchmarks)
        order = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (nq, nk))
        return _Schedule(order, jnp.zeros((nq,), jnp.int32), jnp.full((nq,), nk, jnp.int32))
    pair = jax.vmap(jax.vmap(lambda qr, kr: _pair_kind(cfg, qr, kr), (None, 0)), (0, None))
    kinds = pair(q_ranges, k_ranges)  # [t/c, s/c]
    rank = jnp.select([kinds == FULL, kinds == PARTIAL], [0, 1], 2)
    order = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)
    return _Schedule(order, jnp.sum(kinds == FULL, axis=1), jnp.sum(kinds == PARTIAL, axis=1))


def _visit(sched: _Schedule, i, body, carry):
    """Run ``body(j, carry, masked)`` over query chunk ``i``'s visible KV chunks ``j``."""
    row, full = sched.order[i], sched.full[i]
    carry = lax.fori_loop(0, full, lambda t, c: body(row[t], c, False), carry)
    return lax.fori_loop(full, full + sched.partial[i], lambda t, c: body(row[t], c, True), carry)


def _index(tree, i):
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def _update(tree, values, i):
    return jax.tree.map(lambda x, y: lax.dynamic_update_index_in_dim(x, y, i, 0), tree, values)


def init_state(qc: jax.Array, *refs: jax.Array):
    """Fresh forward state ``(acc [t/c,b,k,r,h], m [t/c,b,k,r], l [t/c,b,k,r])`` in fp32."""
    acc = vary_like(jnp.zeros(qc.shape, jnp.float32), qc, *refs)
    m = jnp.full_like(acc, M_INIT, shape=qc.shape[:-1])
    return acc, m, jnp.zeros_like(m)


def finalize(state):
    """``(acc, m, l)`` → chunk-major fp32 ``out`` (zeros where nothing was seen) and ``lse`` (-inf there)."""
    acc, m, denom = state
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    return acc / safe[..., None], jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def flash_forward(
    qc, kc, vc, q_pos, kv_pos, q_seg, kv_seg, cfg: ChunkConfig, device_index=None, state=None, active=None
):
    """Online-softmax attention over chunk-major inputs, continuing an earlier state (a ring's hops).

    Args:
        qc: ``[t/c, b, k, g·c, h]`` (`q_chunks`); kc, vc: ``[s/c, b, k, c, h]`` (`kv_chunks`);
            positions / segment ids int32 chunk-major ``[t/c, b, c]`` / ``[s/c, b, c]``.
        cfg: chunking and masking settings.
        device_index: ring position for `instrument` counts (None off a ring).
        state: `init_state` or the state returned by an earlier call over other keys; None: fresh.
        active: traced bool; False runs zero iterations and returns ``state`` untouched (a
            skipped ring hop). A zero-trip loop rather than a ``cond``, whose branches would
            need a second copy of the full-size state.

    Returns:
        the unnormalised state ``(acc, m, l)`` (`finalize` gives out and lse).
    """
    nq, b, kh, r, h = qc.shape
    cq, ck = cfg.q_chunk, cfg.kv_chunk
    g = r // cq
    if state is None:
        state = init_state(qc, kc, vc, q_pos, kv_pos, q_seg, kv_seg)
    sched = _schedule(cfg, _ranges(q_pos, q_seg, (2,)), _ranges(kv_pos, kv_seg, (2,)), kc.shape[0])

    def q_step(i, state):
        qi, qpi, qsi = _index((qc, q_pos, q_seg), i)  # [b, k, r, h], [b, cq]

        def kv_step(j, carry, masked):
            kj, vj, kpj, ksj = _index((kc, vc, kv_pos, kv_seg), j)  # [b, k, ck, h], [b, ck]
            acc, m, denom = carry
            instrument.record(cfg.counter, "chunk_fwd", device_index)
            if masked:
                instrument.record(cfg.counter, "chunk_fwd_masked", device_index)
            logits = jnp.einsum("bkrh,bksh->bkrs", qi, kj, preferred_element_type=jnp.float32) * cfg.scale
            if masked:
                mask = chunk_mask(qpi, kpj, qsi, ksj, cfg.causal)[:, None, None]  # [b, 1, 1, cq, ck]
                logits = jnp.where(mask, logits.reshape(b, kh, g, cq, ck), -jnp.inf).reshape(logits.shape)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))  # finite: m starts at M_INIT
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(logits - m_new[..., None])  # [b, k, r, ck]
            pv = jnp.einsum("bkrs,bksh->bkrh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
            return alpha[..., None] * acc + pv, m_new, alpha * denom + jnp.sum(p, axis=-1)

        return _update(state, _visit(sched, i, kv_step, _index(state, i)), i)

    return lax.fori_loop(0, _trips(nq, active), q_step, state)


def flash_backward(
    qc,
    kc,
    vc,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    doc,
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
        qc, kc, vc, positions, segment ids, cfg: chunk-major, as for `flash_forward`.
        doc: output cotangent, chunk-major ``[t/c, b, k, g·c, h]``.
        lse: fp32 ``[t/c, b, k, g·c]`` log-sum-exp of the *complete* attention row (for the
            ring: over all hops), so ``p = exp(s - lse)`` are the final probabilities; rows
            that saw no key must hold any finite value (their mask is all false).
        delta: fp32 like lse: ``sum(do * out, -1) - dlse`` with the final output.
        dq, dk, dv: fp32 chunk-major accumulators to add into in place (zeros when None).
        active: traced bool; False skips all work (see `flash_forward`).

    Returns:
        dq, dk, dv in fp32, chunk-major, including the accumulators.
    """
    nq, b, kh, r, h = qc.shape
    cq, ck = cfg.q_chunk, cfg.kv_chunk
    g = r // cq
    if dq is None:
        dq = vary_like(jnp.zeros(qc.shape, jnp.float32), qc, kc, vc, doc, q_pos, kv_pos, q_seg, kv_seg, lse, delta)
    if dk is None:
        dk, dv = jnp.zeros_like(dq, shape=kc.shape), jnp.zeros_like(dq, shape=vc.shape)
    sched = _schedule(cfg, _ranges(q_pos, q_seg, (2,)), _ranges(kv_pos, kv_seg, (2,)), kc.shape[0])
    # dQ is accumulated transposed, [h, r] = kᵀ[h, ck] · dlogits[ck, r]: a plain product, where
    # dlogitsᵀ · k contracts the leading axis of both operands, which XLA's CPU dot runs ~3× slower.
    kt = jnp.swapaxes(kc, -1, -2)  # [s/c, b, k, h, ck], one copy of K per call

    def q_step(i, carry):
        dq, dk, dv = carry
        qi, doi, lse_i, delta_i, qpi, qsi = _index((qc, doc, lse, delta, q_pos, q_seg), i)

        def kv_step(j, inner, masked):
            dqi_t, dk, dv = inner
            kj, ktj, vj, kpj, ksj = _index((kc, kt, vc, kv_pos, kv_seg), j)  # [b, k, ck, h], [b, ck]
            instrument.record(cfg.counter, "chunk_bwd", device_index)
            # Key-major tiles [ck, r]: dV and dK are then plain products over the query rows.
            logits = jnp.einsum("bksh,bkrh->bksr", kj, qi, preferred_element_type=jnp.float32) * cfg.scale
            p = jnp.exp(logits - lse_i[:, :, None, :])  # [b, k, ck, r]
            if masked:
                mask = chunk_mask(qpi, kpj, qsi, ksj, cfg.causal)  # [b, cq, ck]
                mask = jnp.swapaxes(mask, 1, 2)[:, None, :, None, :]  # [b, 1, ck, 1, cq]
                p = jnp.where(mask, p.reshape(b, kh, ck, g, cq), 0.0).reshape(p.shape)
            dv_j = jnp.einsum("bksr,bkrh->bksh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bksh,bkrh->bksr", vj, doi, preferred_element_type=jnp.float32)
            dlogits = p * (dp - delta_i[:, :, None, :])  # d(loss)/d(logit), before the scale
            dqi_t = dqi_t + jnp.einsum(
                "bkhs,bksr->bkhr", ktj, dlogits.astype(kj.dtype), preferred_element_type=jnp.float32
            )
            dk_j = cfg.scale * jnp.einsum(
                "bksr,bkrh->bksh", dlogits.astype(qi.dtype), qi, preferred_element_type=jnp.float32
            )
            dk = lax.dynamic_update_index_in_dim(dk, _index(dk, j) + dk_j, j, 0)
            dv = lax.dynamic_update_index_in_dim(dv, _index(dv, j) + dv_j, j, 0)
            return dqi_t, dk, dv

        dqi_t = jnp.zeros_like(dq, shape=(b, kh, h, r))
        dqi_t, dk, dv = _visit(sched, i, kv_step, (dqi_t, dk, dv))
        dqi = _index(dq, i) + cfg.scale * jnp.swapaxes(dqi_t, -1, -2)
        return lax.dynamic_update_index_in_dim(dq, dqi, i, 0), dk, dv

    return lax.fori_loop(0, _trips(nq, active), q_step, (dq, dk, dv))


def _trips(count: int, active):
    """Loop trip count: ``count``, or 0 when the traced ``active`` is False."""
    return count if active is None else jnp.where(active, count, 0)
