"""Mosaic GPU (Hopper and newer) flash-attention kernels with masks from positions and segment ids.

Shape letters: the legend in `attention` (b t s n k g h here).

The same contract as `attention.pallas_flash` (per-token int32 positions and segment ids,
``Q_PAD``/``KV_PAD`` padding, native GQA, ``lse = -inf`` and zero rows for queries with no visible
key, a backward from a *given* global LSE and delta), written for Pallas's Mosaic GPU backend,
which JAX makes the default GPU backend on Hopper once Triton is deprecated.

Why a second kernel and not compiler params on the Triton one: Mosaic GPU keeps a kernel's blocks
in shared memory (at most 227 KiB per block on H100), so the Triton kernels' "whole key row as one
block" does not fit (a 16K-key bf16 row at h=128 is 4 MiB). Here every program holds one query
tile (or one key tile) and *streams* the other side through shared memory: two slots, the copy of
tile ``j + 1`` in flight (TMA) while tile ``j`` is on the tensor cores (WGMMA).

Kernels (one warpgroup per program; tiles are multiples of 64 rows, the WGMMA M size):

- forward, grid ``(b, n, t / block_q)``: online softmax over streamed K/V tiles;
- dq, grid ``(b, n, t / block_q)``: streamed K/V tiles, from the given LSE and delta;
- dk/dv, grid ``(b, k, s / block_k)``: streams the query tiles of all g heads of its kv head
  (GQA summed in-kernel; K/V never repeated).

A tile pair the mask hides entirely (causal future, disjoint segment ranges, padding) is skipped
with a ``lax.cond`` on per-tile position / segment ranges computed outside the kernel (four int32
per tile, read as scalars). Its copy still streams (the pipeline stays uniform); its math does not.

Dtypes: bf16 and f16. fp32 does not lower: the probabilities enter WGMMA from registers, where
Mosaic GPU (jax 0.10.2) takes only f16/bf16/8-bit operands ("Only f16, bf16, i8, f8e5m2, f8e4m3fn
are supported for A in registers, got f32"), and fp32 SMEM operands would be read as tf32 anyway.
So fp32 inputs raise `AttentionError`: use the Triton or jnp kernel for fp32.

Interpret mode (CPU): Pallas's GPU interpreter runs these kernels (grid, TMA copies into the two
slots, barriers, masks, skips, online softmax, stores). It has no rule for WGMMA with a register
or transposed operand, `plgpu.load` or `plgpu.layout_cast`, so in interpret mode the products are
plain fp32-accumulating dots of the same SMEM tiles and the layout hints are dropped: the CPU
checks everything but the tensor-core instructions and register layouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attention import instrument
from attention.kernels import AttentionError
from attention.mgpu_tiles import (
    default_interpret,
    full,
    hidden,
    interpret_params,
    mask,
    matmul,
    pipelined,
    row,
    smem,
    tile_ranges,
    vec,
)
from attention.pallas_flash import KV_PAD, Q_PAD, _check, _out_structs, _pad, _pad_segments

DTYPES = (jnp.bfloat16, jnp.float16)
ROW = plgpu.Layout.WGMMA.reduce(1)  # a [m] vector living along the rows of a WGMMA [m, n] tile
COL = plgpu.Layout.WGMMA.reduce(0)  # a [n] vector living along its columns


def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, qr_ref, kr_ref, o_ref, lse_ref,
                q_smem, k_smem, v_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, *,
                causal, scale, groups, counter, interp):  # fmt: skip
    bi, ni, i = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("i")
    ki = lax.div(ni, groups)
    (bq, h), bk, n_k = q_smem.shape, k_smem.shape[1], kr_ref.shape[1]
    rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, ni], q_smem, q_bar.at[0])
    qp = vec(qp_ref.at[bi, rows], ROW, interp)
    qs = vec(qs_ref.at[bi, rows], ROW, interp)
    qr = [qr_ref[bi, i, c] for c in range(4)]
    plgpu.barrier_wait(q_bar.at[0])

    def body(j, tiles, carry):
        k_tile, v_tile = tiles

        def compute(carry):
            acc, m, denom = carry
            instrument.record(counter, "tile_fwd", None)
            cols = pl.ds(j * bk, bk)
            kp = vec(kp_ref.at[bi, cols], COL, interp)
            ks = vec(ks_ref.at[bi, cols], COL, interp)
            logits = matmul(q_smem, k_tile, (bq, bk), interp, transpose_b=True) * scale
            logits = jnp.where(mask(qp, kp, qs, ks, causal), logits, -jnp.inf)
            m_new = jnp.maximum(m, logits.max(axis=1))
            # Rows with nothing visible yet keep max -inf; shift by 0 so exp gives 0, not NaN.
            m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(logits - row(m_safe, logits.shape))
            denom = alpha * denom + p.sum(axis=1)
            # A fresh accumulator plus an add, not `pl.run_state(ACC.init(acc))`: the interpreter lacks run_state.
            acc = acc * row(alpha, acc.shape) + matmul(p.astype(v_tile.dtype), v_tile, acc.shape, interp)
            return acc, m_new, denom

        kr = [kr_ref[bi, j, c] for c in range(4)]
        return lax.cond(hidden(qr, kr, causal), lambda c: c, compute, carry)

    sources = [lambda j, r=r: r.at[bi, pl.ds(j * bk, bk), ki] for r in (k_ref, v_ref)]
    zeros = full((bq, h), 0.0, plgpu.Layout.WGMMA, interp)
    init = (zeros, full((bq,), -jnp.inf, ROW, interp), full((bq,), 0.0, ROW, interp))
    acc, m, denom = pipelined(n_k, sources, (k_smem, v_smem), (k_bar, v_bar), body, init)
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    o_smem[...] = acc / row(safe, acc.shape)
    lse_smem[...] = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[bi, rows, ni])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, ni, rows])
    plgpu.wait_smem_to_gmem(0)


def _dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, qr_ref, kr_ref, do_ref, lse_ref, delta_ref,
               dq_ref, q_smem, do_smem, k_smem, v_smem, dq_smem, q_bar, k_bar, v_bar, *,
               causal, scale, groups, counter, interp):  # fmt: skip
    bi, ni, i = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("i")
    ki = lax.div(ni, groups)
    (bq, h), bk, n_k = q_smem.shape, k_smem.shape[1], kr_ref.shape[1]
    rows = pl.ds(i * bq, bq)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, ni], q_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, ni], do_smem, q_bar.at[1])
    qp, qs = vec(qp_ref.at[bi, rows], ROW, interp), vec(qs_ref.at[bi, rows], ROW, interp)
    lse, delta = vec(lse_ref.at[bi, ni, rows], ROW, interp), vec(delta_ref.at[bi, ni, rows], ROW, interp)
    lse = jnp.where(lse > -jnp.inf, lse, 0.0)  # rows that saw no key: any finite shift (p is masked)
    qr = [qr_ref[bi, i, c] for c in range(4)]
    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])

    def body(j, tiles, dq):
        k_tile, v_tile = tiles

        def compute(dq):
            instrument.record(counter, "tile_dq", None)
            cols = pl.ds(j * bk, bk)
            kp, ks = vec(kp_ref.at[bi, cols], COL, interp), vec(ks_ref.at[bi, cols], COL, interp)
            logits = matmul(q_smem, k_tile, (bq, bk), interp, transpose_b=True) * scale
            p = jnp.where(mask(qp, kp, qs, ks, causal), jnp.exp(logits - row(lse, logits.shape)), 0.0)
            dp = matmul(do_smem, v_tile, (bq, bk), interp, transpose_b=True)
            dlogits = p * (dp - row(delta, dp.shape))  # d loss / d logit, before the scale
            return dq + scale * matmul(dlogits.astype(k_tile.dtype), k_tile, dq.shape, interp)

        kr = [kr_ref[bi, j, c] for c in range(4)]
        return lax.cond(hidden(qr, kr, causal), lambda c: c, compute, dq)

    sources = [lambda j, r=r: r.at[bi, pl.ds(j * bk, bk), ki] for r in (k_ref, v_ref)]
    init = full((bq, h), 0.0, plgpu.Layout.WGMMA, interp)
    dq_smem[...] = pipelined(n_k, sources, (k_smem, v_smem), (k_bar, v_bar), body, init)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dq_smem, dq_ref.at[bi, rows, ni])
    plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, qr_ref, kr_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem, dk_smem, dv_smem, k_bar, q_bar, do_bar, *,
                causal, scale, groups, counter, interp):  # fmt: skip
    """One key tile against the query tiles of all g heads of its kv head, in the transposed orientation.

    Scores are computed as ``k @ q.T`` (``[bk, bq]``), so dK and dV are plain ``[bk, bq] @ [bq, h]``
    products and the query statistics (LSE, delta) broadcast along columns.
    """
    bi, ki, j = lax.axis_index("b"), lax.axis_index("k"), lax.axis_index("j")
    (bk, h), bq, n_q = k_smem.shape, q_smem.shape[1], qr_ref.shape[1]
    cols = pl.ds(j * bk, bk)
    plgpu.copy_gmem_to_smem(k_ref.at[bi, cols, ki], k_smem, k_bar.at[0])
    plgpu.copy_gmem_to_smem(v_ref.at[bi, cols, ki], v_smem, k_bar.at[1])
    kp, ks = vec(kp_ref.at[bi, cols], ROW, interp), vec(ks_ref.at[bi, cols], ROW, interp)
    kr = [kr_ref[bi, j, c] for c in range(4)]
    plgpu.barrier_wait(k_bar.at[0])
    plgpu.barrier_wait(k_bar.at[1])

    def body(step, tiles, carry):  # step runs over (group member, query tile) pairs
        q_tile, do_tile = tiles
        head, i = ki * groups + lax.div(step, n_q), lax.rem(step, n_q)

        def compute(carry):
            dk, dv = carry
            instrument.record(counter, "tile_dkv", None)
            rows = pl.ds(i * bq, bq)
            qp, qs = vec(qp_ref.at[bi, rows], COL, interp), vec(qs_ref.at[bi, rows], COL, interp)
            lse = vec(lse_ref.at[bi, head, rows], COL, interp)
            delta = vec(delta_ref.at[bi, head, rows], COL, interp)
            lse = jnp.where(lse > -jnp.inf, lse, 0.0)
            logits = matmul(k_smem, q_tile, (bk, bq), interp, transpose_b=True) * scale  # [bk, bq]
            col = lambda x: lax.broadcast_in_dim(x, logits.shape, [1])  # noqa: E731
            p = jnp.where(mask(qp, kp, qs, ks, causal, transposed=True), jnp.exp(logits - col(lse)), 0.0)
            dv = dv + matmul(p.astype(do_tile.dtype), do_tile, dv.shape, interp)
            dp = matmul(v_smem, do_tile, (bk, bq), interp, transpose_b=True)
            dlogits = p * (dp - col(delta))
            return dk + scale * matmul(dlogits.astype(q_tile.dtype), q_tile, dk.shape, interp), dv

        qr = [qr_ref[bi, i, c] for c in range(4)]
        return lax.cond(hidden(qr, kr, causal), lambda c: c, compute, carry)

    def source(ref):
        return lambda step: ref.at[bi, pl.ds(lax.rem(step, n_q) * bq, bq), ki * groups + lax.div(step, n_q)]

    zeros = full((bk, h), 0.0, plgpu.Layout.WGMMA, interp)
    sources = (source(q_ref), source(do_ref))
    dk, dv = pipelined(groups * n_q, sources, (q_smem, do_smem), (q_bar, do_bar), body, (zeros, zeros))
    dk_smem[...] = dk
    dv_smem[...] = dv
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(dk_smem, dk_ref.at[bi, cols, ki])
    plgpu.copy_smem_to_gmem(dv_smem, dv_ref.at[bi, cols, ki])
    plgpu.wait_smem_to_gmem(0)


def _check_mgpu(q, k, v, block_q, block_k):
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttentionError(
            f"mosaic_gpu attention takes bf16 or f16 q/k/v (got {q.dtype}/{k.dtype}/{v.dtype}): Mosaic GPU's WGMMA "
            "has no fp32 register operand; cast to bf16, or use kernel='triton' or 'jnp' for fp32."
        )
    if q.shape[-1] % 64:
        raise AttentionError(f"mosaic_gpu attention needs head_dim a multiple of 64, got {q.shape[-1]}.")
    if block_q % 64 or block_k % 64:
        raise AttentionError(f"mosaic_gpu tiles must be multiples of 64 (WGMMA rows), got {block_q}, {block_k}.")


def _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk, *rows):
    """Inputs padded to whole tiles (int32 ids), tile ranges, and ``rows`` (``[b, t, ...]``) padded with zeros."""
    q_pos, q_seg = _pad(q_pos.astype(jnp.int32), bq, Q_PAD), _pad_segments(q_seg.astype(jnp.int32), bq)
    kv_pos, kv_seg = _pad(kv_pos.astype(jnp.int32), bk, KV_PAD), _pad_segments(kv_seg.astype(jnp.int32), bk)
    q, k, v = _pad(q, bq, 0), _pad(k, bk, 0), _pad(v, bk, 0)
    ranges = tile_ranges(q_pos, q_seg, bq), tile_ranges(kv_pos, kv_seg, bk)
    return (q, k, v, q_pos, kv_pos, q_seg, kv_seg, *ranges, *(_pad(r, bq, 0) for r in rows))


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_k", "interpret", "counter"))
def mosaic_gpu_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, scale: float, block_q=64, block_k=64,
                       interpret=None, counter: instrument.WorkCounter | None = None):  # fmt: skip
    """Flash forward over one query block and one key block, K/V streamed through shared memory.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` (bf16 or f16, h a multiple of 64).
        q_pos / kv_pos: int32 ``[b, t]`` / ``[b, s]`` global positions, any order and offset.
        q_seg / kv_seg: int32 ``[b, t]`` / ``[b, s]`` segment ids.
        causal: hide keys at later positions; scale: logit multiplier.
        block_q, block_k: tile lengths, multiples of 64 (inputs are padded to them).
        interpret: Pallas's GPU interpret mode (an ``InterpretGPUParams``; default: off a GPU target).
        counter: count executed tile pairs (interpret mode only: callbacks do not lower to Mosaic GPU).

    Returns:
        out fp32 ``[b, t, n, h]`` (zeros for rows with no visible key), lse fp32 ``[b, t, n]`` (``-inf`` there).
    """
    _check(q, k, q_pos, kv_pos, q_seg, kv_seg)
    _check_mgpu(q, k, v, block_q, block_k)
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    inputs = _prepare(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k)
    tp = inputs[0].shape[1]
    interpret = default_interpret() if interpret is None else interpret
    kernel = functools.partial(_fwd_kernel, causal=causal, scale=float(scale), groups=groups, counter=counter,
                               interp=bool(interpret))  # fmt: skip
    out, lse = plgpu.kernel(
        kernel,
        out_type=_out_structs((((b, tp, n, h), jnp.float32), ((b, n, tp), jnp.float32)), *inputs),
        scratch_types=[
            smem((block_q, h), q.dtype),
            smem((2, block_k, h), q.dtype),
            smem((2, block_k, h), q.dtype),
            plgpu.SMEM((block_q, h), jnp.float32),
            plgpu.SMEM((block_q,), jnp.float32),
            plgpu.Barrier(num_barriers=1),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(b, n, tp // block_q),
        grid_names=("b", "n", "i"),
        interpret=interpret_params(interpret),
    )(*inputs)
    return out[:, :t], jnp.swapaxes(lse, 1, 2)[:, :t]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_k", "interpret", "counter"))
def mosaic_gpu_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta, *, causal: bool, scale: float,
                        block_q=64, block_k=64, interpret=None,
                        counter: instrument.WorkCounter | None = None):  # fmt: skip
    """Gradients of `mosaic_gpu_forward`'s output, tile by tile from a given LSE and delta.

    Args:
        q, k, v, positions, segment ids, causal, scale, tiles, interpret, counter: as for `mosaic_gpu_forward`.
        do: output cotangent ``[b, t, n, h]`` (cast to q's dtype for the tensor cores).
        lse: fp32 ``[b, t, n]`` log-sum-exp of the *complete* attention row (for a ring hop: over all hops).
        delta: fp32 ``[b, t, n]``: ``sum(do * out, -1) - d_lse`` with the final output.

    Returns:
        dq ``[b, t, n, h]``, dk, dv ``[b, s, k, h]``, all fp32 (this key block's share).
    """
    _check(q, k, q_pos, kv_pos, q_seg, kv_seg)
    _check_mgpu(q, k, v, block_q, block_k)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = n // kh
    stats = (lse.astype(jnp.float32), delta.astype(jnp.float32))
    *inputs, do, lse, delta = _prepare(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_k, do.astype(q.dtype), *stats
    )
    # Statistics with the sequence minor, so a tile's LSE is one contiguous [block_q] run.
    inputs = (*inputs, do, jnp.swapaxes(lse, 1, 2), jnp.swapaxes(delta, 1, 2))
    tp, sp = inputs[0].shape[1], inputs[1].shape[1]
    interpret = default_interpret() if interpret is None else interpret
    static = dict(causal=causal, scale=float(scale), groups=groups, counter=counter, interp=bool(interpret))
    dq = plgpu.kernel(
        functools.partial(_dq_kernel, **static),
        out_type=_out_structs((((b, tp, n, h), jnp.float32),), *inputs)[0],
        scratch_types=[
            smem((block_q, h), q.dtype),
            smem((block_q, h), q.dtype),
            smem((2, block_k, h), q.dtype),
            smem((2, block_k, h), q.dtype),
            plgpu.SMEM((block_q, h), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(b, n, tp // block_q),
        grid_names=("b", "n", "i"),
        interpret=interpret_params(interpret),
    )(*inputs)
    dk, dv = plgpu.kernel(
        functools.partial(_dkv_kernel, **static),
        out_type=_out_structs((((b, sp, kh, h), jnp.float32),) * 2, *inputs),
        scratch_types=[
            smem((block_k, h), q.dtype),
            smem((block_k, h), q.dtype),
            smem((2, block_q, h), q.dtype),
            smem((2, block_q, h), q.dtype),
            plgpu.SMEM((block_k, h), jnp.float32),
            plgpu.SMEM((block_k, h), jnp.float32),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=2),
        ],
        grid=(b, kh, sp // block_k),
        grid_names=("b", "k", "j"),
        interpret=interpret_params(interpret),
    )(*inputs)
    return dq[:, :t], dk[:, :s], dv[:, :s]
