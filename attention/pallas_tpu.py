"""Pallas flash-attention kernels for TPU (Mosaic), masked by positions and segment ids.

Shape letters: the legend in `attention` (b t s n k g h here; i / j index query / key tiles).

Same contract as `attention.pallas_flash` (whose kernels are written for Triton): masks from
per-token int32 positions and segment ids, `Q_PAD` / `KV_PAD` padding, GQA without repeating K/V,
``lse = -inf`` and zero output for rows that see no key, a backward from a *given* LSE and delta
(a ring hop's share of the global gradient). What changes is the layout, to what Mosaic accepts:

- heads-major arrays (``[b, n, t, h]``, ``[b, k, s, h]``), so a tile's last two block dimensions
  are (tile length, full h);
- the grid walks key tiles as its innermost, sequential ("arbitrary") axis with the online-softmax
  state in VMEM scratch, instead of a loop inside the kernel over a whole-length VMEM block, so
  VMEM use does not grow with the sequence;
- per-row ids and statistics (positions, segment ids, LSE, delta) travel as *row* arrays
  ``[.., L / tile, 8, tile]`` (a tile's values along the lanes, 8x, not the 128x of a
  lane-broadcast column); a kernel turns one into a column of the score tile in VMEM. The dK/dV
  kernel computes the score tile transposed (``[bk, bq]``) so that every matmul is a plain or "NT"
  product and nothing is transposed in VMEM.

Skipping: the tiles' position and segment ranges are scalar-prefetched into SMEM; a tile pair the
mask hides entirely (causal future, disjoint segments, padding) skips its compute under
``pl.when``. The index maps also clamp the streamed tile index into the span of visible tiles,
so the hidden pairs before and after that span re-use the resident block and cost no DMA either.
In interpret mode `attention.instrument` counts the computed pairs (``tile_fwd``, ``tile_dq``,
``tile_dkv``) into ``counter=``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from attention import instrument
from attention.kernels import current_target
from attention.pallas_flash import KV_PAD, Q_PAD, _check, _out_structs

LANES, SUBLANES = 128, 8
_STATIC = ("causal", "scale", "block_q", "block_k", "interpret", "counter")
# Per-tile scalars in SMEM: q tiles (max pos, min seg, max seg, first / last visible kv tile) and
# kv tiles (min pos, min seg, max seg, first / last visible q tile).
_INFO = 5


def _tile(length: int, block: int) -> int:
    # Mosaic tiles rows by 8 (16 for bf16) and lanes by 128; a short sequence takes one tile of
    # its length rounded up to a power of two (>= 16), so a tile is <= 128 or a multiple of 128.
    if block < 8 or block % 8 or (block > LANES and block % LANES):
        raise ValueError(f"mosaic_tpu attention: tile {block} must be a multiple of 8, and of 128 above 128.")
    return min(block, max(16, 1 << (length - 1).bit_length()))


def _pad(x: jax.Array, axis: int, multiple: int, value=0, edge: bool = False) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    # Edge padding keeps a tile's segment range, so the skip test stays tight.
    return jnp.pad(x, widths, mode="edge") if edge else jnp.pad(x, widths, constant_values=value)


def _rows(x: jax.Array, tile: int) -> jax.Array:
    """``[.., L]`` -> ``[.., L / tile, 8, tile]``: a tile's values along the lanes, on 8 sublanes.

    A block of the last two dimensions equals the full array dimensions, which Mosaic accepts
    for any tile length (a ``[.., 8, L]`` array would need tiles that are multiples of 128).
    """
    lead, length = x.shape[:-1], x.shape[-1]
    x = x.reshape(*lead, length // tile, 1, tile)
    return jnp.broadcast_to(x, (*lead, length // tile, SUBLANES, tile))


def _row(ref) -> jax.Array:
    """A row-layout block as ``[1, tile]``: one value per score-tile column."""
    return ref[:1, :]


def _col(ref) -> jax.Array:
    """A row-layout block as ``[tile, 1]``: one value per score-tile row (a cheap relayout in VMEM)."""
    return jnp.expand_dims(ref[0], -1)


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A column-layout ``[rows, 128]`` value as ``[rows, width]`` (width <= 128 or a multiple of 128)."""
    return x[:, :width] if width <= LANES else jnp.tile(x, (1, width // LANES))


def _hidden(q_max, qs_min, qs_max, k_min, ks_min, ks_max, causal: bool):
    """The mask hides every pair of a q tile and a kv tile with these ranges (arrays or scalars)."""
    hidden = (k_min == KV_PAD) | (q_max == Q_PAD) | (qs_max < ks_min) | (ks_max < qs_min)
    return hidden | (k_min > q_max) if causal else hidden


def _mask(qp, qs, kp, ks, causal: bool):
    """Bool score tile from broadcastable query / key positions and segment ids."""
    mask = (qs == ks) & (kp != KV_PAD) & (qp != Q_PAD)
    return mask & (qp >= kp) if causal else mask


def _span(visible: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """First and last visible index along ``axis`` (0, 0 where none is)."""
    size = visible.shape[axis]
    idx = lax.broadcasted_iota(jnp.int32, visible.shape, axis)
    lo = jnp.min(jnp.where(visible, idx, size), axis)
    hi = jnp.max(jnp.where(visible, idx, -1), axis)
    return jnp.where(hi < 0, 0, lo), jnp.maximum(hi, 0)


def _tile_info(q_pos, kv_pos, q_seg, kv_seg, bq: int, bk: int, causal: bool):
    """Flat int32 SMEM tables ``[b * nq * 5]`` and ``[b * nk * 5]`` (see `_INFO`)."""
    b = q_pos.shape[0]
    qp, qs = q_pos.reshape(b, -1, bq), q_seg.reshape(b, -1, bq)
    kp, ks = kv_pos.reshape(b, -1, bk), kv_seg.reshape(b, -1, bk)
    q_ranges = (qp.max(-1), qs.min(-1), qs.max(-1))  # each [b, nq]
    k_ranges = (kp.min(-1), ks.min(-1), ks.max(-1))  # each [b, nk]
    visible = ~_hidden(*(r[:, :, None] for r in q_ranges), *(r[:, None, :] for r in k_ranges), causal)  # [b, nq, nk]
    q_info = jnp.stack([*q_ranges, *_span(visible, 2)], -1)
    k_info = jnp.stack([*k_ranges, *_span(visible, 1)], -1)
    return q_info.reshape(-1).astype(jnp.int32), k_info.reshape(-1).astype(jnp.int32)


def _pair_hidden(q_info, k_info, bi, i, j, nq: int, nk: int, causal: bool):
    qa, ka = (bi * nq + i) * _INFO, (bi * nk + j) * _INFO
    return _hidden(*(q_info[qa + c] for c in range(3)), *(k_info[ka + c] for c in range(3)), causal)


def _clamp(info, row, idx):
    """Tile index ``idx`` clamped into the visible span of table row ``row``: hidden pairs outside the
    span re-use the block already in VMEM (no DMA)."""
    at = row * _INFO
    return jnp.minimum(jnp.maximum(idx, info[at + 3]), info[at + 4])


def _dot(a, b, nt: bool = False):
    """``a @ b`` (or ``a @ b.T``: the "NT" form the MXU takes without a transpose), fp32 accumulation."""
    dims = (((1,), (1,)), ((), ())) if nt else (((1,), (0,)), ((), ()))
    # Explicit, so a global ``jax_default_matmul_precision`` cannot ask Mosaic for an fp32
    # contraction of bf16 operands (which it rejects): bf16 runs natively, fp32 exactly.
    fp32 = a.dtype == b.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if fp32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _fwd_kernel(q_info, k_info, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, causal, scale, nq, nk, counter):  # fmt: skip
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(jnp.logical_not(_pair_hidden(q_info, k_info, bi, i, j, nq, nk, causal)))
    def _compute():
        instrument.record(counter, "tile_fwd", None)
        v = v_ref[...]
        bk, h = v.shape
        logits = _dot(q_ref[...], k_ref[...], nt=True) * scale  # [bq, bk]
        mask = _mask(_col(qp_ref), _col(qs_ref), _row(kp_ref), _row(ks_ref), causal)
        logits = jnp.where(mask, logits, -jnp.inf)
        m_prev = m_scr[...]  # [bq, 128], all lanes equal
        m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
        # Rows with nothing visible yet keep max -inf; shift by 0 so exp gives 0, not NaN.
        m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(logits - _lanes(m_safe, bk))
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = _lanes(alpha, h) * acc_scr[...] + _dot(p.astype(v.dtype), v)
        m_scr[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_scr[...]
        seen = denom > 0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_scr[...] / _lanes(safe, acc_scr.shape[1])).astype(o_ref.dtype)
        lse = jnp.where(seen, m_scr[...] + jnp.log(safe), -jnp.inf)  # [bq, 128], all lanes equal
        lse_ref[...] = jnp.broadcast_to(lse[:, 0][None, :], lse_ref.shape)  # to the row layout


def _dq_kernel(q_info, k_info, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref,
               dq_ref, acc_scr, *, causal, scale, nq, nk, counter):  # fmt: skip
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(jnp.logical_not(_pair_hidden(q_info, k_info, bi, i, j, nq, nk, causal)))
    def _compute():
        instrument.record(counter, "tile_dq", None)
        k, v = k_ref[...], v_ref[...]
        logits = _dot(q_ref[...], k, nt=True) * scale  # [bq, bk]
        mask = _mask(_col(qp_ref), _col(qs_ref), _row(kp_ref), _row(ks_ref), causal)
        p = jnp.where(mask, jnp.exp(logits - _col(lse_ref)), 0.0)
        dlogits = p * (_dot(do_ref[...], v, nt=True) - _col(delta_ref))  # before the scale
        acc_scr[...] += scale * _dot(dlogits.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = acc_scr[...]


def _dkv_kernel(q_info, k_info, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, causal, scale, nq, nk, groups, counter):  # fmt: skip
    bi, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    # Transposed frame: score tiles are [bk, bq], query-side values run along the lanes.
    @pl.when(jnp.logical_not(_pair_hidden(q_info, k_info, bi, i, j, nq, nk, causal)))
    def _compute():
        instrument.record(counter, "tile_dkv", None)
        q, do = q_ref[...], do_ref[...]  # [bq, h]
        logits = _dot(k_ref[...], q, nt=True) * scale  # [bk, bq]
        mask = _mask(_row(qp_ref), _row(qs_ref), _col(kp_ref), _col(ks_ref), causal)
        p = jnp.where(mask, jnp.exp(logits - _row(lse_ref)), 0.0)
        dv_scr[...] += _dot(p.astype(do.dtype), do)  # [bk, h]
        dlogits = p * (_dot(v_ref[...], do, nt=True) - _row(delta_ref))
        dk_scr[...] += scale * _dot(dlogits.astype(q.dtype), q)

    @pl.when((gi == groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = dk_scr[...]
        dv_ref[...] = dv_scr[...]


def _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_k):
    """Heads-major, tile-padded operands, their id layouts and the SMEM tile tables."""
    _check(q, k, q_pos, kv_pos, q_seg, kv_seg)
    bq, bk = _tile(q.shape[1], block_q), _tile(k.shape[1], block_k)
    q_pos = _pad(q_pos.astype(jnp.int32), 1, bq, Q_PAD)
    kv_pos = _pad(kv_pos.astype(jnp.int32), 1, bk, KV_PAD)
    q_seg = _pad(q_seg.astype(jnp.int32), 1, bq, edge=True)
    kv_seg = _pad(kv_seg.astype(jnp.int32), 1, bk, edge=True)
    q_info, k_info = _tile_info(q_pos, kv_pos, q_seg, kv_seg, bq, bk, causal)
    heads_major = lambda x, tile: _pad(jnp.swapaxes(x, 1, 2), 2, tile)  # noqa: E731  [b, l, n, h] -> [b, n, l, h]
    ops = dict(q=heads_major(q, bq), k=heads_major(k, bk), v=heads_major(v, bk), q_pos=q_pos, kv_pos=kv_pos,
               q_seg=q_seg, kv_seg=kv_seg, q_info=q_info, k_info=k_info)  # fmt: skip
    return ops, bq, bk


def _params(interpret, semantics):
    interpret = current_target().interpret if interpret is None else interpret
    return interpret, pltpu.CompilerParams(dimension_semantics=semantics)


@functools.partial(jax.jit, static_argnames=_STATIC)
def mosaic_tpu_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, scale: float, block_q=512,
                       block_k=512, interpret=None, counter: instrument.WorkCounter | None = None):  # fmt: skip
    """Flash forward over one query block and one key block (a whole sequence, or one ring hop).

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` (bf16 or fp32; kv heads never repeated).
        q_pos / kv_pos: int32 ``[b, t]`` / ``[b, s]`` global positions, any order and offset.
        q_seg / kv_seg: int32 ``[b, t]`` / ``[b, s]`` segment ids (zeros for one document).
        causal: hide keys at later positions; scale: logit multiplier.
        block_q, block_k: tile lengths (multiples of 8, and of 128 above 128; a shorter sequence
            takes one tile of its length rounded up to a power of two). 512 amortises the fixed
            per-grid-step cost on TPU while the fp32 score tile (1 MiB) stays well inside VMEM.
        interpret: Pallas interpret mode (default: the compile target's, `attention.compile_target`).
        counter: count computed tile pairs into it (interpret mode; None: no callbacks).

    Returns:
        out fp32 ``[b, t, n, h]`` (zeros for rows with no visible key) and lse fp32 ``[b, t, n]``
        (``-inf`` for those rows).
    """
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    ops, bq, bk = _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_k)
    tp, sp = ops["q"].shape[2], ops["k"].shape[2]
    nq, nk = tp // bq, sp // bk
    interpret, params = _params(interpret, ("parallel", "parallel", "parallel", "arbitrary"))

    def kv_map(bi, ni, i, j, q_info, k_info):
        return bi, lax.div(ni, groups), _clamp(q_info, bi * nq + i, j), 0

    def kv_row_map(bi, ni, i, j, q_info, k_info):
        return bi, _clamp(q_info, bi * nq + i, j), 0, 0

    q_tile = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j, *_: (bi, ni, i, 0))
    q_row = pl.BlockSpec((None, None, SUBLANES, bq), lambda bi, ni, i, j, *_: (bi, i, 0, 0))
    stat_row = pl.BlockSpec((None, None, None, SUBLANES, bq), lambda bi, ni, i, j, *_: (bi, ni, i, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bk, h), kv_map)
    kv_row = pl.BlockSpec((None, None, SUBLANES, bk), kv_row_map)
    inputs = (ops["q"], ops["k"], ops["v"], _rows(ops["q_pos"], bq), _rows(ops["q_seg"], bq))
    inputs += (_rows(ops["kv_pos"], bk), _rows(ops["kv_seg"], bk))
    kernel = functools.partial(_fwd_kernel, causal=causal, scale=float(scale), nq=nq, nk=nk, counter=counter)
    out, lse = pl.pallas_call(
        kernel,
        out_shape=_out_structs((((b, n, tp, h), jnp.float32), ((b, n, nq, SUBLANES, bq), jnp.float32)), *inputs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, nq, nk),
            in_specs=[q_tile, kv_tile, kv_tile, q_row, q_row, kv_row, kv_row],
            out_specs=[q_tile, stat_row],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32)] * 2 + [pltpu.VMEM((bq, h), jnp.float32)],
        ),
        compiler_params=params,
        interpret=interpret,
        name="ringllama_mosaic_fwd",
    )(ops["q_info"], ops["k_info"], *inputs)
    lse = lse[:, :, :, 0].reshape(b, n, tp)
    return jnp.swapaxes(out, 1, 2)[:, :t], jnp.swapaxes(lse, 1, 2)[:, :t]


@functools.partial(jax.jit, static_argnames=_STATIC)
def mosaic_tpu_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta, *, causal: bool, scale: float,
                        block_q=512, block_k=512, interpret=None,
                        counter: instrument.WorkCounter | None = None):  # fmt: skip
    """Gradients of `mosaic_tpu_forward`'s output recomputed tile by tile from a given LSE and delta.

    Args:
        q, k, v, positions, segment ids, causal, scale, tiles, interpret, counter: as for
            `mosaic_tpu_forward`.
        do: output cotangent ``[b, t, n, h]``.
        lse: fp32 ``[b, t, n]`` log-sum-exp of the *complete* attention row (for a ring hop:
            over all hops), so ``p = exp(s - lse)`` are the final probabilities.
        delta: fp32 ``[b, t, n]``: ``sum(do * out, -1) - d_lse`` with the final output.

    Returns:
        dq ``[b, t, n, h]``, dk, dv ``[b, s, k, h]``, all fp32 (this key block's share).
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = n // kh
    ops, bq, bk = _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, block_q, block_k)
    tp, sp = ops["q"].shape[2], ops["k"].shape[2]
    nq, nk = tp // bq, sp // bk
    d_o = _pad(jnp.swapaxes(do.astype(q.dtype), 1, 2), 2, bq)  # [b, n, tp, h]
    lse = lse.astype(jnp.float32)
    lse = jnp.where(lse > -jnp.inf, lse, 0.0)  # rows that see no key: any finite shift (p is masked)
    lse = _pad(jnp.swapaxes(lse, 1, 2), 2, bq)  # [b, n, tp]
    delta = _pad(jnp.swapaxes(delta.astype(jnp.float32), 1, 2), 2, bq)
    cfg = dict(causal=causal, scale=float(scale), nq=nq, nk=nk, counter=counter)
    info = (ops["q_info"], ops["k_info"])

    # dQ: grid (b, n, q tile, kv tile), the kv tiles sequential into a VMEM accumulator.
    interpret, params = _params(interpret, ("parallel", "parallel", "parallel", "arbitrary"))

    def kv_map(bi, ni, i, j, q_info, k_info):
        return bi, lax.div(ni, groups), _clamp(q_info, bi * nq + i, j), 0

    def kv_row_map(bi, ni, i, j, q_info, k_info):
        return bi, _clamp(q_info, bi * nq + i, j), 0, 0

    q_tile = pl.BlockSpec((None, None, bq, h), lambda bi, ni, i, j, *_: (bi, ni, i, 0))
    q_row = pl.BlockSpec((None, None, SUBLANES, bq), lambda bi, ni, i, j, *_: (bi, i, 0, 0))
    stat_row = pl.BlockSpec((None, None, None, SUBLANES, bq), lambda bi, ni, i, j, *_: (bi, ni, i, 0, 0))
    kv_tile = pl.BlockSpec((None, None, bk, h), kv_map)
    kv_row = pl.BlockSpec((None, None, SUBLANES, bk), kv_row_map)
    q_ids, kv_ids = (_rows(ops[x], bq) for x in ("q_pos", "q_seg")), (_rows(ops[x], bk) for x in ("kv_pos", "kv_seg"))
    q_ids, kv_ids, stats = tuple(q_ids), tuple(kv_ids), (_rows(lse, bq), _rows(delta, bq))
    inputs = (ops["q"], ops["k"], ops["v"], *q_ids, *kv_ids, d_o, *stats)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **cfg),
        out_shape=_out_structs((((b, n, tp, h), jnp.float32),), *inputs)[0],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, nq, nk),
            in_specs=[q_tile, kv_tile, kv_tile, q_row, q_row, kv_row, kv_row, q_tile, stat_row, stat_row],
            out_specs=q_tile,
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        compiler_params=params,
        interpret=interpret,
        name="ringllama_mosaic_dq",
    )(*info, *inputs)

    # dK/dV: grid (b, kv head, kv tile, group head, q tile); the g query heads of a kv head and
    # all q tiles are sequential into VMEM accumulators, so GQA is summed in-kernel.
    _, params = _params(interpret, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"))

    def q_map(bi, ki, j, gi, i, q_info, k_info):
        return bi, ki * groups + gi, _clamp(k_info, bi * nk + j, i), 0

    def q_row_map(bi, ki, j, gi, i, q_info, k_info):
        return bi, _clamp(k_info, bi * nk + j, i), 0, 0

    def stat_row_map(bi, ki, j, gi, i, q_info, k_info):
        return bi, ki * groups + gi, _clamp(k_info, bi * nk + j, i), 0, 0

    q_tile = pl.BlockSpec((None, None, bq, h), q_map)
    q_row = pl.BlockSpec((None, None, SUBLANES, bq), q_row_map)
    stat_row = pl.BlockSpec((None, None, None, SUBLANES, bq), stat_row_map)
    kv_tile = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j, *_: (bi, ki, j, 0))
    kv_row = pl.BlockSpec((None, None, SUBLANES, bk), lambda bi, ki, j, *_: (bi, j, 0, 0))
    inputs = (ops["q"], ops["k"], ops["v"], *q_ids, *kv_ids, d_o, *stats)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, groups=groups, **cfg),
        out_shape=_out_structs((((b, kh, sp, h), jnp.float32),) * 2, *inputs),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, groups, nq),
            in_specs=[q_tile, kv_tile, kv_tile, q_row, q_row, kv_row, kv_row, q_tile, stat_row, stat_row],
            out_specs=[kv_tile, kv_tile],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32)] * 2,
        ),
        compiler_params=params,
        interpret=interpret,
        name="ringllama_mosaic_dkv",
    )(*info, *inputs)
    unmajor = lambda x, length: jnp.swapaxes(x, 1, 2)[:, :length]  # noqa: E731
    return unmajor(dq, t), unmajor(dk, s), unmajor(dv, s)
