"""Local attention kernels behind one interface: the per-device work of every strategy.

Shape letters: the legend in `attention` (b t s n k h here).

A context-parallel strategy (`attention.strategies`) moves queries, keys and values between
devices; the driver (`attention.driver`) then runs one or more *hops*, each a query block
against a key block, and merges them. A hop is computed by a `LocalKernel`:

- ``forward(spec, q, k, v, qp, kp, qs, ks, active, index) -> (out, lse)``: fp32 ``out [b,t,n,h]``
  normalised over this block's keys and fp32 ``lse [b,t,n]`` (``-inf`` and zeros for rows that
  see no key);
- ``backward(spec, q, k, v, qp, kp, qs, ks, do, lse, delta, active, index) -> (dq, dk, dv)``:
  fp32, this block's share, from the *complete* row's ``lse`` and ``delta = Σ do·out − dlse``,
  so ``exp(s − lse)`` are the final probabilities on every hop;
- ``tile(spec, length)``: the tile a block of ``length`` tokens is padded to a multiple of
  (the driver pads, with positions the masks hide);
- ``checks_vma``: whether it runs under ``shard_map(check_vma=True)``.

``active`` is a traced bool (or None): False means the mask hides the whole block and the
kernel must return zeros and ``-inf`` without computing. ``index`` is the ring position
`attention.instrument` counts under. A new kernel is one module plus one line in
`attention.kernel_table.KERNEL_TABLE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument
from attention.flash import (
    ChunkConfig,
    finalize,
    flash_backward,
    flash_forward,
    kv_chunks,
    kv_unchunk,
    q_chunks,
    q_unchunk,
    stat_chunks,
    stat_unchunk,
    token_chunks,
    vary_like,
)
from attention.pallas_flash import pallas_backward, pallas_forward
from attention.pallas_mgpu import mosaic_gpu_backward, mosaic_gpu_forward
from attention.pallas_tpu import mosaic_tpu_backward, mosaic_tpu_forward


@dataclass(frozen=True)
class KernelSpec:
    """Static settings every kernel takes.

    Attributes:
        causal: hide keys at later positions.
        scale: logit multiplier.
        chunk: the requested chunk (jnp) or largest tile (Pallas) length.
        skip_masked: skip work the mask hides (hops, chunk pairs); False computes and masks
            everything (the classic ring, for benchmarks only).
        counter: count executed work into it (`attention.instrument`; None: no callbacks).
        q_tile / kv_tile: the tiles the driver padded the blocks to (`LocalKernel.tile`); the
            kernel's chunks or tiles divide them.
    """

    causal: bool
    scale: float
    chunk: int = 512
    skip_masked: bool = True
    counter: instrument.WorkCounter | None = None
    q_tile: int = 0
    kv_tile: int = 0


@dataclass(frozen=True)
class LocalKernel:
    """One local kernel: see the module docstring for the contract of each function."""

    name: str
    forward: Callable
    backward: Callable
    tile: Callable[[KernelSpec, int], int]
    checks_vma: bool


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# jnp: the chunk loops of `attention.flash`.


def _jnp_tile(spec: KernelSpec, length: int) -> int:
    # Equal chunks that cover the block with no padding beyond the last: 600 tokens at chunk 512
    # give two chunks of 300, not 512 + a padded 512.
    return -(-length // -(-length // max(1, spec.chunk)))


def _jnp_cfg(spec: KernelSpec, t: int, s: int) -> ChunkConfig:
    cq, ck = spec.q_tile or _jnp_tile(spec, t), spec.kv_tile or _jnp_tile(spec, s)
    return ChunkConfig(spec.causal, spec.scale, cq, ck, spec.skip_masked, spec.counter)


def _jnp_forward(spec, q, k, v, qp, kp, qs, ks, active=None, index=None):
    cfg = _jnp_cfg(spec, q.shape[1], k.shape[1])
    kh, cq, ck = k.shape[2], cfg.q_chunk, cfg.kv_chunk
    chunked = (q_chunks(q, kh, cq), kv_chunks(k, ck), kv_chunks(v, ck))
    ids = (token_chunks(qp, cq), token_chunks(kp, ck), token_chunks(qs, cq), token_chunks(ks, ck))
    out, lse = finalize(flash_forward(*chunked, *ids, cfg, index, active=active))
    return q_unchunk(out, cq), stat_unchunk(lse, cq)


def _jnp_backward(spec, q, k, v, qp, kp, qs, ks, do, lse, delta, active=None, index=None):
    cfg = _jnp_cfg(spec, q.shape[1], k.shape[1])
    kh, cq, ck = k.shape[2], cfg.q_chunk, cfg.kv_chunk
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # rows that saw no key: any finite shift (mask is all false)
    dq, dk, dv = flash_backward(
        q_chunks(q, kh, cq),
        kv_chunks(k, ck),
        kv_chunks(v, ck),
        token_chunks(qp, cq),
        token_chunks(kp, ck),
        token_chunks(qs, cq),
        token_chunks(ks, ck),
        q_chunks(do, kh, cq),
        stat_chunks(lse, kh, cq),
        stat_chunks(delta, kh, cq),
        cfg,
        index,
        active=active,
    )
    return q_unchunk(dq, cq), kv_unchunk(dk), kv_unchunk(dv)


# ---------------------------------------------------------------------------------------------
# Pallas kernels: a hidden block takes a cond's identity branch (no kernel launch).

# Largest tiles: 128×128 fp32 scores forward; the backward also keeps dK/dV (or dQ) accumulators
# per tile, so 64 (as FlashAttention-2's Triton kernels do at head_dim 128).
MAX_TILE, MAX_TILE_BWD = 128, 64


def _triton_tile(spec: KernelSpec, length: int) -> int:
    return min(MAX_TILE, _next_pow2(min(spec.chunk, length)))  # Triton loads power-of-two tiles


def _empty_forward(q, *refs):
    out = vary_like(jnp.zeros(q.shape, jnp.float32), q, *refs)
    return out, jnp.full_like(out, -jnp.inf, shape=q.shape[:3])


def _gated(active, compute, empty):
    return compute() if active is None else lax.cond(active, compute, empty)


def _triton_tiles(spec: KernelSpec, t: int, s: int, cap: int) -> tuple[int, int]:
    return min(cap, spec.q_tile or _triton_tile(spec, t)), min(cap, spec.kv_tile or _triton_tile(spec, s))


def _pallas_pair(forward_fn, backward_fn, tiles):
    """Kernel forward/backward functions around a Pallas kernel pair; ``tiles(spec, t, s, backward)``."""

    def forward(spec, q, k, v, qp, kp, qs, ks, active=None, index=None):
        bq, bk = tiles(spec, q.shape[1], k.shape[1], False)

        def compute():
            kw = dict(causal=spec.causal, scale=spec.scale, block_q=bq, block_k=bk, counter=spec.counter)
            return forward_fn(q, k, v, qp, kp, qs, ks, **kw)

        return _gated(active, compute, lambda: _empty_forward(q, k, v, qp, kp, qs, ks))

    def backward(spec, q, k, v, qp, kp, qs, ks, do, lse, delta, active=None, index=None):
        bq, bk = tiles(spec, q.shape[1], k.shape[1], True)

        def compute():
            kw = dict(causal=spec.causal, scale=spec.scale, block_q=bq, block_k=bk, counter=spec.counter)
            return backward_fn(q, k, v, qp, kp, qs, ks, do, lse, delta, **kw)

        def empty():
            dq = vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, do, lse)
            return dq, jnp.zeros_like(dq, shape=k.shape), jnp.zeros_like(dq, shape=v.shape)

        return _gated(active, compute, empty)

    return forward, backward


_triton_forward, _triton_backward = _pallas_pair(
    pallas_forward,
    pallas_backward,
    lambda spec, t, s, bwd: _triton_tiles(spec, t, s, MAX_TILE_BWD if bwd else MAX_TILE),
)

# Mosaic GPU: one warpgroup per program, tiles of 64 rows (the WGMMA M size) forward and backward.
MGPU_TILE = 64
_mgpu_forward, _mgpu_backward = _pallas_pair(
    mosaic_gpu_forward, mosaic_gpu_backward, lambda spec, t, s, bwd: (MGPU_TILE, MGPU_TILE)
)


# Mosaic TPU: (8, 128)-aligned tiles, up to 512 (fewer grid steps); a short block gets one
# power-of-two tile of at least 16 rows.
TPU_TILE = 512


def _tpu_tile(spec: KernelSpec, length: int) -> int:
    cap = max(128, min(TPU_TILE, spec.chunk) // 128 * 128)
    return cap if length > cap else max(16, _next_pow2(length))


_tpu_forward, _tpu_backward = _pallas_pair(
    mosaic_tpu_forward,
    mosaic_tpu_backward,
    lambda spec, t, s, bwd: (spec.q_tile or _tpu_tile(spec, t), spec.kv_tile or _tpu_tile(spec, s)),
)

# The kernels of this module; `attention.kernel_table` adds those built on them (cudnn).
BASE_KERNELS: dict[str, LocalKernel] = {
    "jnp": LocalKernel("jnp", _jnp_forward, _jnp_backward, _jnp_tile, checks_vma=True),
    # Pallas's interpret mode does not type its loops' manual axes (jax 0.10): run unchecked.
    "triton": LocalKernel("triton", _triton_forward, _triton_backward, _triton_tile, checks_vma=False),
    "mosaic_tpu": LocalKernel("mosaic_tpu", _tpu_forward, _tpu_backward, _tpu_tile, checks_vma=False),
    "mosaic_gpu": LocalKernel("mosaic_gpu", _mgpu_forward, _mgpu_backward, lambda spec, n: MGPU_TILE, checks_vma=False),
}


def pad_halves(x: jax.Array, tile: int, value, edge: bool = False) -> jax.Array:
    """Pad each half of ``x [b, L, ...]`` along L to a multiple of ``tile`` (an odd L: the whole).

    A ring shard holds one early and one late chunk of the sequence (zigzag); padding each half
    keeps every tile inside one of them, so causal tile skipping still balances the work.
    """
    b, length = x.shape[:2]
    halves = 2 if length % 2 == 0 and length > 1 else 1
    part = length // halves
    pad = -part % tile
    if not pad:
        return x
    y = x.reshape(b, halves, part, *x.shape[2:])
    widths = [(0, 0)] * y.ndim
    widths[2] = (0, pad)
    y = jnp.pad(y, widths, mode="edge") if edge else jnp.pad(y, widths, constant_values=value)
    return y.reshape(b, halves * (part + pad), *x.shape[2:])


def unpad_halves(x: jax.Array, length: int) -> jax.Array:
    """Inverse of `pad_halves` for an array padded from ``length`` tokens."""
    b, padded = x.shape[:2]
    if padded == length:
        return x
    halves = 2 if length % 2 == 0 and length > 1 else 1
    y = x.reshape(b, halves, padded // halves, *x.shape[2:])[:, :, : length // halves]
    return y.reshape(b, length, *x.shape[2:])
