"""Mosaic GPU building blocks of `attention.pallas_mgpu`: SMEM tiles, the two-slot TMA pipeline,
tile ranges and masks from positions, WGMMA products, and their Pallas-GPU-interpreter stand-ins.

Interpret mode (CPU): Pallas's GPU interpreter has no rule for WGMMA with a register or transposed
operand, `plgpu.load` or `plgpu.layout_cast`, so these helpers take an ``interp`` flag and use plain
fp32-accumulating dots and plain loads there; the grid, copies, barriers and masks are the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from attention.flash import KV_PAD, Q_PAD
from attention.kernels import current_target


def default_interpret():
    """GPU interpret mode (Pallas simulates Mosaic GPU on the CPU) unless the target is a GPU."""
    if current_target().platform == "gpu":
        return False
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private in jax 0.10

    return InterpretGPUParams()


def interpret_params(interpret):
    """``interpret=True`` means Pallas's GPU interpreter (the plain HLO interpreter cannot run Mosaic GPU refs)."""
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()
    return interpret or None


def smem(shape, dtype):
    """Shared-memory tile laid out for WGMMA: 128-byte swizzle over (8, 64) bf16 tiles (h = 64, 128)."""
    swizzle = plgpu.find_swizzle(shape[-1] * jnp.dtype(dtype).itemsize * 8)
    tiling = plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize))
    return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def tile_ranges(pos, seg, block: int):
    """int32 ``[b, tiles, 4]``: per tile (max position, min position, min segment, max segment).

    Padded queries (``Q_PAD``) and keys (``KV_PAD``) sit at the ends of the int32 range, so a
    tile of padding reads as hidden from both sides.
    """
    b, length = pos.shape
    pos, seg = pos.reshape(b, length // block, block), seg.reshape(b, length // block, block)
    return jnp.stack([pos.max(-1), pos.min(-1), seg.min(-1), seg.max(-1)], axis=-1)


def hidden(qr, kr, causal: bool):
    """Scalar bool from two tile-range rows: no (query, key) pair of these tiles is visible."""
    q_max, q_seg_lo, q_seg_hi = qr[0], qr[2], qr[3]
    kv_min, k_seg_lo, k_seg_hi = kr[1], kr[2], kr[3]
    hidden = (kv_min == KV_PAD) | (q_max == Q_PAD) | (q_seg_hi < k_seg_lo) | (k_seg_hi < q_seg_lo)
    return (hidden | (kv_min > q_max)) if causal else hidden


def mask(qp, kp, qs, ks, causal: bool, transposed: bool = False):
    """Bool ``[tq, tk]`` (``[tk, tq]`` if transposed) from ``[tq]`` query and ``[tk]`` key positions / segments."""
    q_dim, k_dim = (1, 0) if transposed else (0, 1)
    shape = [0, 0]
    shape[q_dim], shape[k_dim] = qp.shape[0], kp.shape[0]
    at_q = lambda x: lax.broadcast_in_dim(x, tuple(shape), [q_dim])  # noqa: E731
    at_k = lambda x: lax.broadcast_in_dim(x, tuple(shape), [k_dim])  # noqa: E731
    mask = (at_q(qs) == at_k(ks)) & (at_k(kp) != KV_PAD) & (at_q(qp) != Q_PAD)
    return (mask & (at_q(qp) >= at_k(kp))) if causal else mask


def matmul(a, b, shape, interp: bool, transpose_b: bool = False):
    """fp32 ``a @ b`` (``a @ b.T`` with ``transpose_b``) on the tensor cores (WGMMA).

    a: registers or an SMEM ref; b: an SMEM ref. Pallas's GPU interpreter (jax 0.10) runs WGMMA
    only on two plain SMEM refs (no register operand, no `plgpu.transpose_ref` view), so interpret
    mode multiplies the same tiles with a plain fp32-accumulating dot instead.
    """
    if interp:
        a = a if isinstance(a, jax.Array) else a[...]
        dims = (((1,), (1 if transpose_b else 0,)), ((), ()))
        return lax.dot_general(a, b[...], dims, preferred_element_type=jnp.float32)
    b = plgpu.transpose_ref(b, (1, 0)) if transpose_b else b

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]  # waits for the WGMMA

    return pl.run_scoped(run, plgpu.ACC(shape, jnp.float32))


def pipelined(steps, sources, smems, barriers, body, carry):
    """``fori_loop`` over ``steps`` tiles streamed through two SMEM slots; returns the final carry.

    ``sources[i](step)`` is the GMEM view of array i's tile for that step. The TMA copy of tile
    ``j + 1`` is issued before tile ``j`` is used: it goes to the slot tile ``j - 1`` used, whose
    WGMMAs have finished (`matmul` waits for them). ``body(step, tiles, carry)`` gets the SMEM tiles.
    """

    def issue(step, slot):
        for source, smem, barrier in zip(sources, smems, barriers, strict=True):
            plgpu.copy_gmem_to_smem(source(step), smem.at[slot], barrier.at[slot])

    issue(0, 0)

    def loop(j, carry):
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < steps)
        def _prefetch():
            issue(j + 1, 1 - slot)

        for barrier in barriers:
            plgpu.barrier_wait(barrier.at[slot])
        return body(j, [smem.at[slot] for smem in smems], carry)

    return lax.fori_loop(0, steps, loop, carry)


def vec(ref, layout, interp: bool):
    """A 1-D int32/fp32 slice of a GMEM ref in registers, laid out to broadcast against WGMMA tiles.

    Pallas's GPU interpreter (jax 0.10) has no rule for `plgpu.load` and `plgpu.layout_cast`;
    layouts say where values live, not what they are, so interpret mode reads the plain values.
    """
    return ref[...] if interp else plgpu.load(ref, (), layout=layout, optimized=False)


def full(shape, value, layout, interp: bool):
    x = jnp.full(shape, value, jnp.float32)
    return x if interp else plgpu.layout_cast(x, layout)


def row(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])
