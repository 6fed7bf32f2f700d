"""Pallas flash-attention kernels whose masks come from positions and segment ids (any offsets).

Shape letters: the legend in `attention` (b t s n k g h here).

Why our own kernels rather than JAX's shipped ones: ``jax.experimental.pallas.ops.gpu.attention``
and ``ops.tpu.splash_attention`` build their causal mask from array indices (query and key
blocks aligned at position 0), which a ring hop — a query block against another shard's keys,
in zigzag or striped order — is not; the GPU op also needs equal query and kv head counts
(K/V repeated for GQA) and differentiates only its own forward, while the ring's backward must
start from the *global* LSE. These kernels take per-token int32 positions and segment ids, so
one kernel serves blockwise attention, every ring hop and every token layout.

Kernels (one program per tile, online softmax in fp32, bf16/fp32 inputs):

- forward, grid ``(b, n, t / block_q)``: loops over key tiles, returns out and LSE;
- dq, grid ``(b, n, t / block_q)``: loops over key tiles from the given (global) LSE and delta;
- dk/dv, grid ``(b, k, s / block_k)``: loops over the g query heads of its kv head and over
  query tiles, so GQA stays native (K/V are read per kv head, never repeated, and dK/dV are
  summed over the group inside the kernel).

A tile pair that the mask hides entirely (causal future, disjoint segment ranges, padding;
decided from the tiles' position and segment ranges) takes the identity branch of a
``lax.cond``: no FLOPs. Off GPU/TPU the kernels run in Pallas interpret mode, where
`attention.instrument` can count the tile pairs each kernel really computed (``tile_fwd``,
``tile_dq``, ``tile_dkv``) into a ``counter=`` (a static argument; None emits nothing).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attention import instrument
from attention.kernels import current_target

# Padded query rows and keys carry these positions (the values `attention.flash` uses too):
# padded queries see no key, padded keys are seen by no query, causal or not.
Q_PAD = -(2**31)
KV_PAD = 2**31 - 1
SQ = pl.squeezed  # a block dimension of size 1 that the kernel does not see


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def default_interpret() -> bool:
    """Interpret mode unless the compile target (`attention.compile_target`) compiles Pallas."""
    return current_target().interpret


def _pad(x: jax.Array, multiple: int, value) -> jax.Array:
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _pad_segments(x: jax.Array, multiple: int) -> jax.Array:
    # Edge padding keeps a tile's segment range, so the skip rule stays tight.
    pad = -x.shape[1] % multiple
    return jnp.pad(x, ((0, 0), (0, pad)), mode="edge") if pad else x


def _tile_mask(qp, kp, qs, ks, causal: bool):
    """Bool ``[tq, tk]`` from ``[tq]`` query and ``[tk]`` key positions / segment ids."""
    mask = (qs[:, None] == ks[None, :]) & (kp != KV_PAD)[None, :] & (qp != Q_PAD)[:, None]
    if causal:
        mask = mask & (qp[:, None] >= kp[None, :])
    return mask


def _tile_hidden(qp, kp, qs, ks, causal: bool):
    """Scalar bool: the mask hides every pair of these tiles (conservative: may say False, never wrong)."""
    kv_min = jnp.min(kp)
    hidden = (kv_min == KV_PAD) | (jnp.max(qp) == Q_PAD)
    if causal:
        hidden = hidden | (kv_min > jnp.max(qp))
    return hidden | (jnp.max(qs) < jnp.min(ks)) | (jnp.max(ks) < jnp.min(qs))


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, o_ref, lse_ref, *,
                causal, scale, block_k, counter):  # fmt: skip
    q = q_ref[...]  # [bq, h]
    qp, qs = qp_ref[...], qs_ref[...]  # [bq]
    bq, h = q.shape

    def body(j, carry):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kp, ks = kp_ref[tile], ks_ref[tile]

        def compute(carry):
            acc, m, denom = carry
            instrument.record(counter, "tile_fwd", None)
            k, v = k_ref[tile, :], v_ref[tile, :]  # [bk, h]
            logits = _dot(q, k, 1, 1) * scale  # [bq, bk]
            logits = jnp.where(_tile_mask(qp, kp, qs, ks, causal), logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            # Rows with nothing visible yet keep max -inf; shift by 0 so exp gives 0, not NaN.
            m_safe = jnp.where(m_new > -jnp.inf, m_new, 0.0)
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(logits - m_safe[:, None])
            acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
            return acc, m_new, alpha * denom + jnp.sum(p, axis=-1)

        return lax.cond(_tile_hidden(qp, kp, qs, ks, causal), lambda c: c, compute, carry)

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, denom = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
    seen = denom > 0
    safe = jnp.where(seen, denom, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               causal, scale, block_k, counter):  # fmt: skip
    q, do = q_ref[...], do_ref[...]  # [bq, h]
    qp, qs = qp_ref[...], qs_ref[...]
    lse = lse_ref[...]
    lse = jnp.where(lse > -jnp.inf, lse, 0.0)  # rows that saw no key: any finite shift (p is masked)
    delta = delta_ref[...]

    def body(j, dq):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kp, ks = kp_ref[tile], ks_ref[tile]

        def compute(dq):
            instrument.record(counter, "tile_dq", None)
            k, v = k_ref[tile, :], v_ref[tile, :]
            logits = _dot(q, k, 1, 1) * scale
            p = jnp.where(_tile_mask(qp, kp, qs, ks, causal), jnp.exp(logits - lse[:, None]), 0.0)  # [bq, bk]
            dlogits = p * (_dot(do, v, 1, 1) - delta[:, None])  # d loss / d logit, before the scale
            return dq + scale * _dot(dlogits.astype(k.dtype), k)

        return lax.cond(_tile_hidden(qp, kp, qs, ks, causal), lambda c: c, compute, dq)

    dq_ref[...] = lax.fori_loop(0, k_ref.shape[0] // block_k, body, jnp.zeros(q.shape, jnp.float32))


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    qp_ref,
    kp_ref,
    qs_ref,
    ks_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    *,
    causal,
    scale,
    block_q,
    groups,
    counter,
):
    k, v = k_ref[...], v_ref[...]  # [bk, h]
    kp, ks = kp_ref[...], ks_ref[...]
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for gi in range(groups):  # the query heads sharing this kv head: GQA summed in-kernel

        def body(i, carry, gi=gi):
            tile = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            qp, qs = qp_ref[tile], qs_ref[tile]

            def compute(carry):
                dk, dv = carry
                instrument.record(counter, "tile_dkv", None)
                q, do = q_ref[tile, gi, :], do_ref[tile, gi, :]  # [bq, h]
                lse, delta = lse_ref[tile, gi], delta_ref[tile, gi]
                lse = jnp.where(lse > -jnp.inf, lse, 0.0)
                logits = _dot(q, k, 1, 1) * scale  # [bq, bk]
                p = jnp.where(_tile_mask(qp, kp, qs, ks, causal), jnp.exp(logits - lse[:, None]), 0.0)
                dv = dv + _dot(p.astype(do.dtype), do, 0, 0)  # [bk, h]
                dlogits = p * (_dot(do, v, 1, 1) - delta[:, None])
                return dk + scale * _dot(dlogits.astype(q.dtype), q, 0, 0), dv

            return lax.cond(_tile_hidden(qp, kp, qs, ks, causal), lambda c: c, compute, carry)

        dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, (dk, dv))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _varying(aval) -> frozenset:
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier releases call it vma
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _out_structs(shapes, *inputs):
    """Output structs typed like the most-varying input (``shard_map(check_vma=True)`` needs it).

    Inside a ring every input varies over the ring axis (K/V blocks arrive by ``ppermute``), so
    the input whose varying axes are the union describes the outputs.
    """
    avals = [jax.typeof(x) for x in inputs]
    union = frozenset().union(*map(_varying, avals))
    like = next(a for a in avals if _varying(a) == union) if union else None
    structs = []
    for shape, dtype in shapes:
        if like is None:
            structs.append(jax.ShapeDtypeStruct(shape, dtype))
        elif getattr(like, "manual_axis_type", None) is not None:
            structs.append(jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=like.manual_axis_type))
        elif getattr(like, "vma", None) is not None:
            structs.append(jax.ShapeDtypeStruct(shape, dtype, vma=like.vma))
        else:
            structs.append(jax.ShapeDtypeStruct(shape, dtype))
    return tuple(structs)


def _compiler_params(interpret: bool, tile_elems: int):
    """Triton launch settings on GPU (None elsewhere): 8 warps for 128×128 score tiles, else 4."""
    if interpret or current_target().platform != "gpu":
        return None
    params = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams  # name before jax 0.7
    return params(num_warps=8 if tile_elems >= 128 * 128 else 4, num_stages=2)


def _blocks(t: int, s: int, block_q: int, block_k: int) -> tuple[int, int]:
    # Power-of-two tiles (Triton needs them); a short sequence gets one tile of its padded length.
    return min(_next_pow2(block_q), _next_pow2(t)), min(_next_pow2(block_k), _next_pow2(s))


def _padded(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bq, bk, *rows):
    """Inputs padded to whole tiles; ``rows`` are extra ``[b, t, ...]`` arrays padded with zeros."""
    q, q_pos, q_seg = _pad(q, bq, 0), _pad(q_pos, bq, Q_PAD), _pad_segments(q_seg, bq)
    k, v, kv_pos, kv_seg = _pad(k, bk, 0), _pad(v, bk, 0), _pad(kv_pos, bk, KV_PAD), _pad_segments(kv_seg, bk)
    return (q, k, v, q_pos, kv_pos, q_seg, kv_seg, *(_pad(r, bq, 0) for r in rows))


def _check(q, k, q_pos, kv_pos, q_seg, kv_seg):
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"pallas attention: k {k.shape} does not fit q {q.shape} (GQA needs n % kv_heads == 0).")
    for name, x, length in (("q_pos", q_pos, t), ("kv_pos", kv_pos, k.shape[1]), ("q_seg", q_seg, t)):
        if x.shape != (b, length):
            raise ValueError(f"pallas attention: {name} must be [{b}, {length}], got {x.shape}.")
    if kv_seg.shape != kv_pos.shape:
        raise ValueError(f"pallas attention: kv_seg must be {kv_pos.shape}, got {kv_seg.shape}.")


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_k", "interpret", "counter"))
def pallas_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal: bool, scale: float, block_q=128, block_k=128,
                   interpret=None, counter: instrument.WorkCounter | None = None):  # fmt: skip
    """Flash forward over one query block and one key block (a whole sequence, or one ring hop).

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` (bf16 or fp32; kv heads never repeated).
        q_pos / kv_pos: int32 ``[b, t]`` / ``[b, s]`` global positions, any order and offset.
        q_seg / kv_seg: int32 ``[b, t]`` / ``[b, s]`` segment ids (zeros for one document).
        causal: hide keys at later positions; scale: logit multiplier.
        block_q, block_k: tile lengths (rounded to powers of two; inputs are padded to them).
        interpret: Pallas interpret mode (default: off GPU/TPU).
        counter: count executed tile pairs into it (`attention.instrument`; None: no callbacks).

    Returns:
        out fp32 ``[b, t, n, h]`` (zeros for rows with no visible key) and lse fp32 ``[b, t, n]``
        (``-inf`` for those rows).
    """
    _check(q, k, q_pos, kv_pos, q_seg, kv_seg)
    b, t, n, h = q.shape
    s, groups = k.shape[1], n // k.shape[2]
    bq, bk = _blocks(t, s, block_q, block_k)
    q, k, v, q_pos, kv_pos, q_seg, kv_seg = _padded(
        q,
        k,
        v,
        q_pos.astype(jnp.int32),
        kv_pos.astype(jnp.int32),
        q_seg.astype(jnp.int32),
        kv_seg.astype(jnp.int32),
        bq,
        bk,
    )
    tp, sp = q.shape[1], k.shape[1]
    inputs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    interpret = default_interpret() if interpret is None else interpret
    kernel = functools.partial(_fwd_kernel, causal=causal, scale=float(scale), block_k=bk, counter=counter)
    q_tile = pl.BlockSpec((SQ, bq, SQ, h), lambda bi, ni, i: (bi, i, ni, 0))
    kv_all = pl.BlockSpec((SQ, sp, SQ, h), lambda bi, ni, i: (bi, 0, ni // groups, 0))
    qrow = pl.BlockSpec((SQ, bq), lambda bi, ni, i: (bi, i))
    krow = pl.BlockSpec((SQ, sp), lambda bi, ni, i: (bi, 0))
    out, lse = pl.pallas_call(
        kernel,
        out_shape=_out_structs((((b, tp, n, h), jnp.float32), ((b, tp, n), jnp.float32)), *inputs),
        grid=(b, n, tp // bq),
        in_specs=[q_tile, kv_all, kv_all, qrow, krow, qrow, krow],
        out_specs=[q_tile, pl.BlockSpec((SQ, bq, SQ), lambda bi, ni, i: (bi, i, ni))],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, bq * bk),
        name="ringllama_flash_fwd",
    )(*inputs)
    return out[:, :t], lse[:, :t]


@functools.partial(jax.jit, static_argnames=("causal", "scale", "block_q", "block_k", "interpret", "counter"))
def pallas_backward(
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
    *,
    causal: bool,
    scale: float,
    block_q=64,
    block_k=64,
    interpret=None,
    counter: instrument.WorkCounter | None = None,
):
    """Gradients of `pallas_forward`'s output recomputed tile by tile from a given LSE and delta.

    Args:
        q, k, v, positions, segment ids, causal, scale, tiles, interpret, counter: as for `pallas_forward`
            (the backward keeps dK/dV or dQ accumulators beside its tiles: smaller tiles, default 64).
        do: output cotangent ``[b, t, n, h]``.
        lse: fp32 ``[b, t, n]`` log-sum-exp of the *complete* attention row (for a ring hop:
            over all hops), so ``p = exp(s - lse)`` are the final probabilities.
        delta: fp32 ``[b, t, n]``: ``sum(do * out, -1) - d_lse`` with the final output.

    Returns:
        dq ``[b, t, n, h]``, dk, dv ``[b, s, k, h]``, all fp32 (this key block's share).
    """
    _check(q, k, q_pos, kv_pos, q_seg, kv_seg)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    groups = n // kh
    bq, bk = _blocks(t, s, block_q, block_k)
    ints = (x.astype(jnp.int32) for x in (q_pos, kv_pos, q_seg, kv_seg))
    f32 = (lse.astype(jnp.float32), delta.astype(jnp.float32))
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta = _padded(q, k, v, *ints, bq, bk, do.astype(q.dtype), *f32)
    tp, sp = q.shape[1], k.shape[1]
    interpret = default_interpret() if interpret is None else interpret
    inputs = (q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta)

    q_tile = pl.BlockSpec((SQ, bq, SQ, h), lambda bi, ni, i: (bi, i, ni, 0))
    kv_all = pl.BlockSpec((SQ, sp, SQ, h), lambda bi, ni, i: (bi, 0, ni // groups, 0))
    qrow = pl.BlockSpec((SQ, bq), lambda bi, ni, i: (bi, i))
    krow = pl.BlockSpec((SQ, sp), lambda bi, ni, i: (bi, 0))
    stat = pl.BlockSpec((SQ, bq, SQ), lambda bi, ni, i: (bi, i, ni))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, causal=causal, scale=float(scale), block_k=bk, counter=counter),
        out_shape=_out_structs((((b, tp, n, h), jnp.float32),), *inputs)[0],
        grid=(b, n, tp // bq),
        in_specs=[q_tile, kv_all, kv_all, qrow, krow, qrow, krow, q_tile, stat, stat],
        out_specs=q_tile,
        interpret=interpret,
        compiler_params=_compiler_params(interpret, bq * bk),
        name="ringllama_flash_dq",
    )(*inputs)

    # dK/dV: one program per (batch, kv head, key tile) reads the whole query block of its g heads.
    q_group = pl.BlockSpec((SQ, tp, groups, h), lambda bi, ki, j: (bi, 0, ki, 0))
    kv_tile = pl.BlockSpec((SQ, bk, SQ, h), lambda bi, ki, j: (bi, j, ki, 0))
    qrow_all = pl.BlockSpec((SQ, tp), lambda bi, ki, j: (bi, 0))
    krow_tile = pl.BlockSpec((SQ, bk), lambda bi, ki, j: (bi, j))
    stat_group = pl.BlockSpec((SQ, tp, groups), lambda bi, ki, j: (bi, 0, ki))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, causal=causal, scale=float(scale), block_q=bq, groups=groups, counter=counter),
        out_shape=_out_structs((((b, sp, kh, h), jnp.float32),) * 2, *inputs),
        grid=(b, kh, sp // bk),
        in_specs=[q_group, kv_tile, kv_tile, qrow_all, krow_tile, qrow_all, krow_tile, q_group, stat_group, stat_group],
        out_specs=[kv_tile, kv_tile],
        interpret=interpret,
        compiler_params=_compiler_params(interpret, bq * bk),
        name="ringllama_flash_dkv",
    )(*inputs)
    return dq[:, :t], dk[:, :s], dv[:, :s]
