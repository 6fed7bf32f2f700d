"""Differentiable attention on the Pallas kernels of `attention.pallas_flash`: one device, and ring hops.

Shape letters: the legend in `attention` (b t s n k h here).

- `pallas_attention`: exact attention over a whole (local) sequence with a ``jax.custom_vjp``
  that saves only q, k, v, the output and the LSE (the backward kernels recompute the
  probabilities), the ``kernel="pallas"`` path of blockwise attention.
- `ring_pallas_shard`: ring attention for one shard inside ``jax.shard_map``, each hop a Pallas
  kernel call. A hop's ``(out_i, lse_i)`` merges into the running result with
  `attention.merge.merge_partials`; a hop whose KV block the mask hides entirely is skipped
  (``lax.cond``: no kernel launch). The backward is its own ``jax.custom_vjp`` fed with the
  *global* output and LSE: every hop's kernel recomputes the final probabilities
  ``exp(s - lse)``, and the dK/dV accumulator travels around the ring with its K/V block, one
  more ``ppermute`` bringing it home. The next hop's ``ppermute`` is issued before this hop's
  kernel, so communication can overlap compute.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument
from attention.merge import merge_partials
from attention.pallas_flash import KV_PAD, Q_PAD, default_interpret, pallas_backward, pallas_forward

# Largest tiles: 128×128 fp32 scores forward; the backward also keeps dK/dV (or dQ) accumulators
# per tile, so 64 (as FlashAttention-2's Triton kernels do at head_dim 128).
MAX_TILE, MAX_TILE_BWD = 128, 64


@dataclass(frozen=True)
class PallasConfig:
    """Static kernel settings: causal mask, logit scale, forward and backward tile lengths, interpret
    mode (None: on unless on GPU/TPU), and the `attention.instrument.WorkCounter` the kernels count
    executed tiles and hops into (None: no callbacks; static, so a counted trace is its own cache entry)."""

    causal: bool
    scale: float
    block_q: int = 128
    block_k: int = 128
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    interpret: bool | None = None
    counter: instrument.WorkCounter | None = None

    @classmethod
    def for_chunk(
        cls, causal: bool, scale: float, chunk_size: int, counter: instrument.WorkCounter | None = None
    ) -> PallasConfig:
        """The settings for a blockwise/ring ``chunk_size``: tiles of it, capped at the maxima above."""
        fwd, bwd = min(chunk_size, MAX_TILE), min(chunk_size, MAX_TILE_BWD)
        return cls(causal=causal, scale=float(scale), block_q=fwd, block_k=fwd, block_q_bwd=bwd, block_k_bwd=bwd,
                   counter=counter)  # fmt: skip

    def kwargs(self, backward: bool = False) -> dict:
        interpret = default_interpret() if self.interpret is None else self.interpret
        bq, bk = (self.block_q_bwd, self.block_k_bwd) if backward else (self.block_q, self.block_k)
        return dict(
            causal=self.causal, scale=self.scale, block_q=bq, block_k=bk, interpret=interpret, counter=self.counter
        )


def _delta(out, d_out, d_lse):
    # d lse / d logit = p, so an LSE cotangent folds into delta: ds = p * (dp - (delta - d_lse)).
    return jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse


def pallas_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    cfg: PallasConfig,
) -> tuple[jax.Array, jax.Array]:
    """Exact GQA attention through the Pallas kernels, differentiable in q, k, v (and through the lse).

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]``; positions / segment ids int ``[b, t]`` /
            ``[b, s]`` (any order, any offset).
        cfg: kernel settings.

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]``; rows with no visible key
        give zeros and ``-inf``.
    """
    ints = (x.astype(jnp.int32) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids))
    return _attend(cfg, q, k, v, *ints)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = pallas_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **cfg.kwargs())
    return out.astype(q.dtype), lse


def _attend_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _attend(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attend_bwd(cfg, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    dq, dk, dv = pallas_backward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, lse, _delta(out, d_out, d_lse), **cfg.kwargs(backward=True)
    )
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# Ring hops.


def _vary(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """``x`` made varying over the mesh axes the ``refs`` vary over (value unchanged): loop carries
    and cond branches must have the type the loop body produces under ``check_vma``."""
    for r in refs:
        x = x + jnp.zeros_like(r, shape=(), dtype=x.dtype)
    return x


def _hidden(q_pos, kv_pos, q_seg, kv_seg, causal: bool):
    """Scalar bool: the mask hides every (query, key) pair of the blocks, in every batch row."""
    kv_min = jnp.min(kv_pos, axis=1)
    q_max = jnp.max(q_pos, axis=1)
    hidden = (kv_min == KV_PAD) | (q_max == Q_PAD)
    if causal:
        hidden = hidden | (kv_min > q_max)
    disjoint = (jnp.max(q_seg, axis=1) < jnp.min(kv_seg, axis=1)) | (jnp.max(kv_seg, axis=1) < jnp.min(q_seg, axis=1))
    return jnp.all(hidden | disjoint)


def _shift(x, axis_name: str, size: int):
    """Send ``x`` (a pytree) one step along the ring: shard r → r + 1."""
    return lax.ppermute(x, axis_name, [(r, (r + 1) % size) for r in range(size)])


def _ring_loop(axis_name: str, block, state, hop):
    """``state, travel = hop(block_i, state, travel)`` over the N hops, block i+1 fetched before hop i."""
    size = lax.axis_size(axis_name)

    def step(carry, last: bool):
        block, state, travel = carry
        nxt = None if last else _shift(block, axis_name, size)  # in flight during the kernel
        state, travel = hop(block, state, travel)
        if travel is not None and size > 1:
            travel = _shift(travel, axis_name, size)
        return nxt, state, travel

    carry = (block, *state)
    if size > 1:
        carry, _ = lax.scan(lambda c, _: (step(c, last=False), None), carry, None, length=size - 1)
    carry = step(carry, last=True)
    return carry[1], carry[2]


def ring_pallas_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    cfg: PallasConfig,
    axis_name: str = "sequence",
    skip_hidden_hops: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Ring attention for one shard with Pallas hops; call inside ``jax.shard_map`` over ``axis_name``.

    Args:
        q: local ``[b, t, n, h]``; k, v: local ``[b, s, k, h]``; positions / segment ids int
            ``[b, t]`` / ``[b, s]``: the local tokens' global positions (any layout).
        cfg: kernel settings.
        axis_name: the ring's mesh axis.
        skip_hidden_hops: False launches every hop's kernel (tiles are still skipped inside).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]`` over every shard's keys.
    """
    ints = (x.astype(jnp.int32) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids))
    return _ring(_half_tiles(cfg, q.shape[1], k.shape[1]), axis_name, skip_hidden_hops, q, k, v, *ints)


def _half_tiles(cfg: PallasConfig, t: int, s: int) -> PallasConfig:
    """Tiles that never span both zigzag halves of a shard (one early, one late chunk of the sequence),
    so causal tile skipping balances the work: capped at the largest power of two dividing half the block."""

    def cap(tile: int, length: int) -> int:
        half = length // 2 if length % 2 == 0 and length > 1 else length
        return min(tile, half & -half)  # largest power of two dividing half

    return dataclasses.replace(
        cfg,
        block_q=cap(cfg.block_q, t),
        block_k=cap(cfg.block_k, s),
        block_q_bwd=cap(cfg.block_q_bwd, t),
        block_k_bwd=cap(cfg.block_k_bwd, s),
    )


def _active(cfg, skip, q_pos, kv_pos, q_seg, kv_seg):
    return jnp.bool_(True) if not skip else ~_hidden(q_pos, kv_pos, q_seg, kv_seg, cfg.causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(cfg, axis_name, skip, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _ring_forward(cfg, axis_name, skip, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _ring_forward(cfg, axis_name, skip, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    index = lax.axis_index(axis_name)
    out0 = _vary(jnp.zeros(q.shape, jnp.float32), q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    lse0 = jnp.full_like(out0, -jnp.inf, shape=q.shape[:3])

    def hop(block, acc, _):
        kb, vb, kpb, ksb = block
        active = _active(cfg, skip, q_pos, kpb, q_seg, ksb)
        instrument.record(cfg.counter, "hop_fwd", index, when=active)

        def compute(out, lse):
            out_i, lse_i = pallas_forward(q, kb, vb, q_pos, kpb, q_seg, ksb, **cfg.kwargs())
            return merge_partials(out, lse, out_i, lse_i)

        return lax.cond(active, compute, lambda out, lse: (out, lse), *acc), None

    (out, lse), _ = _ring_loop(axis_name, (k, v, kv_pos, kv_seg), ((out0, lse0), None), hop)
    return out.astype(q.dtype), lse


def _ring_fwd(cfg, axis_name, skip, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _ring_forward(cfg, axis_name, skip, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(cfg, axis_name, skip, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    index = lax.axis_index(axis_name)
    delta = _delta(out, d_out, d_lse)  # global output and LSE: final probabilities on every hop
    dq0 = _vary(jnp.zeros(q.shape, jnp.float32), q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, delta)
    dkv0 = (jnp.zeros_like(dq0, shape=k.shape), jnp.zeros_like(dq0, shape=v.shape))

    def hop(block, dq, dkv):
        kb, vb, kpb, ksb = block
        active = _active(cfg, skip, q_pos, kpb, q_seg, ksb)
        instrument.record(cfg.counter, "hop_bwd", index, when=active)

        def compute(dq, dk, dv):
            dq_i, dk_i, dv_i = pallas_backward(
                q, kb, vb, q_pos, kpb, q_seg, ksb, d_out, lse, delta, **cfg.kwargs(backward=True)
            )
            return dq + dq_i, dk + dk_i, dv + dv_i

        dq, dk, dv = lax.cond(active, compute, lambda *acc: acc, dq, *dkv)
        return dq, (dk, dv)

    # The dK/dV accumulator travels with its block and, after N sends, is back on its own shard.
    dq, (dk, dv) = _ring_loop(axis_name, (k, v, kv_pos, kv_seg), (dq0, dkv0), hop)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
