"""The one attention driver: hops of a local kernel over key blocks, with an exact backward.

Shape letters: the legend in `attention` (b t s n k h here).

Every implementation that is not dense runs here, on any `attention.local_kernels` kernel:

- ``local``: one hop against the given K/V (blockwise attention on one device, and Ulysses
  after its all-to-all has made the sequence whole);
- ``gather``: K/V are all-gathered over ``axis_name`` (at kv-head size) and the local queries
  take one hop against them; the backward gathers again and reduce-scatters dK/dV in fp32;
- ``ring``: K/V blocks travel around ``axis_name`` for N hops. The next block's ``ppermute`` is
  issued before this hop's kernel, so communication overlaps compute; a hop whose block the mask
  hides entirely (causal future, disjoint documents) is skipped; each hop's ``(out, lse)``
  merges into the running result by log-sum-exp. ``stride`` > 1 runs one ring per residue
  class: device i sends to i + stride (hybrid's rings across Ulysses groups of that size).

The backward is one ``jax.custom_vjp`` fed with the *global* output and LSE: every hop's kernel
recomputes the final probabilities ``exp(s − lse)``, and in a ring the dK/dV accumulator travels
with its K/V block, one more ``ppermute`` bringing it home. Residuals are the local q, k, v, out
and lse: O(S/N) per device in every mode. Blocks are padded per half to whole tiles of the
kernel (`local_kernels.pad_halves`) with positions the masks hide, so tiles never collapse and
never span a zigzag shard's two chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument
from attention.flash import KV_PAD, Q_PAD, block_is_masked, vary_like
from attention.kernel_table import get_kernel
from attention.local_kernels import KernelSpec, pad_halves, unpad_halves
from attention.merge import merge_partials

MODES = ("local", "gather", "ring")


@dataclass(frozen=True)
class DriverConfig:
    """Static settings of one driver call: kernel name (`choose_kernel`), its spec, mode, axis, stride."""

    kernel: str
    spec: KernelSpec
    mode: str = "local"
    axis_name: str | None = None
    stride: int = 1


def attend(cfg: DriverConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> tuple[jax.Array, jax.Array]:
    """Attention of local queries against the mode's keys; call inside ``shard_map`` unless ``local``.

    Args:
        cfg: the driver settings.
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]``; positions / segment ids int32 ``[b, t]`` /
            ``[b, s]`` (the local tokens' global positions, any layout).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]``; differentiable in q, k, v
        (and through the lse).
    """
    t, s = q.shape[1], k.shape[1]
    kernel = get_kernel(cfg.kernel)
    half = lambda n: n // 2 if n % 2 == 0 and n > 1 else n  # noqa: E731
    spec = dataclasses.replace(cfg.spec, q_tile=kernel.tile(cfg.spec, half(t)), kv_tile=kernel.tile(cfg.spec, half(s)))
    cfg = dataclasses.replace(cfg, spec=spec)
    qt, kt = spec.q_tile, spec.kv_tile
    q, q_pos, q_seg = pad_halves(q, qt, 0), pad_halves(q_pos, qt, Q_PAD), pad_halves(q_seg, qt, 0, edge=True)
    k, v = pad_halves(k, kt, 0), pad_halves(v, kt, 0)
    kv_pos, kv_seg = pad_halves(kv_pos, kt, KV_PAD), pad_halves(kv_seg, kt, 0, edge=True)
    out, lse = _attend(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return unpad_halves(out, t), unpad_halves(lse, t)


def _shift(cfg: DriverConfig, x):
    """Send ``x`` (a pytree) one step along the ring: device i → i + stride."""
    size = lax.axis_size(cfg.axis_name)
    return lax.ppermute(x, cfg.axis_name, [(i, (i + cfg.stride) % size) for i in range(size)])


def _hops(cfg: DriverConfig) -> int:
    return lax.axis_size(cfg.axis_name) // cfg.stride if cfg.mode == "ring" else 1


def _loop(cfg: DriverConfig, block, state, hop):
    """``state, travel = hop(block_i, state, travel)`` over the hops, block i+1 fetched before hop i.

    ``travel`` (or None) is sent on after each hop together with the block it belongs to.
    """
    hops = _hops(cfg)

    def step(carry, last: bool):
        block, state, travel = carry
        nxt = None if last else _shift(cfg, block)  # in flight during the kernel
        state, travel = hop(block, state, travel)
        if travel is not None and hops > 1:
            travel = _shift(cfg, travel)
        return nxt, state, travel

    carry = (block, *state)
    if hops > 1:  # hops 0 .. N-2 prefetch the next block; the last has nothing left to fetch
        carry, _ = lax.scan(lambda c, _: (step(c, last=False), None), carry, None, length=hops - 1)
    carry = step(carry, last=True)
    return carry[1], carry[2]


def _keys(cfg: DriverConfig, k, v, kv_pos, kv_seg):
    """The key block the first hop sees: the local one, or the gathered sequence."""
    if cfg.mode != "gather":
        return k, v, kv_pos, kv_seg
    return tuple(lax.all_gather(x, cfg.axis_name, axis=1, tiled=True) for x in (k, v, kv_pos, kv_seg))


def _active(cfg: DriverConfig, q_pos, kv_pos, q_seg, kv_seg):
    """Traced bool: this hop's block is not entirely hidden (None: always run)."""
    if cfg.mode != "ring" or not cfg.spec.skip_masked:
        return None
    return ~block_is_masked(q_pos, kv_pos, q_seg, kv_seg, cfg.spec.causal)


def _index(cfg: DriverConfig):
    return lax.axis_index(cfg.axis_name) if cfg.axis_name is not None and cfg.mode != "local" else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: DriverConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _forward(cfg: DriverConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    kernel, index = get_kernel(cfg.kernel), _index(cfg)
    out0 = vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    lse0 = jnp.full_like(out0, -jnp.inf, shape=q.shape[:3])

    def hop(block, acc, _):
        kb, vb, kpb, ksb = block
        active = _active(cfg, q_pos, kpb, q_seg, ksb)
        if cfg.mode == "ring":
            instrument.record(cfg.spec.counter, "hop_fwd", index, when=active)
        out_i, lse_i = kernel.forward(cfg.spec, q, kb, vb, q_pos, kpb, q_seg, ksb, active, index)
        return merge_partials(*acc, out_i, lse_i), None

    (out, lse), _ = _loop(cfg, _keys(cfg, k, v, kv_pos, kv_seg), ((out0, lse0), None), hop)
    return out.astype(q.dtype), lse


def _fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _bwd(cfg, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    kernel, index = get_kernel(cfg.kernel), _index(cfg)
    # d lse / d logit = p, so an LSE cotangent folds into delta: ds = p * (dp - (delta - d_lse)).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
    block = _keys(cfg, k, v, kv_pos, kv_seg)
    dq0 = vary_like(jnp.zeros(q.shape, jnp.float32), q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, delta)
    dkv0 = (jnp.zeros_like(dq0, shape=block[0].shape), jnp.zeros_like(dq0, shape=block[1].shape))

    def hop(block, dq, dkv):
        kb, vb, kpb, ksb = block
        active = _active(cfg, q_pos, kpb, q_seg, ksb)
        if cfg.mode == "ring":
            instrument.record(cfg.spec.counter, "hop_bwd", index, when=active)
        dq_i, dk_i, dv_i = kernel.backward(
            cfg.spec, q, kb, vb, q_pos, kpb, q_seg, ksb, d_out, lse, delta, active, index
        )
        return dq + dq_i, (dkv[0] + dk_i, dkv[1] + dv_i)

    # In a ring the dK/dV accumulator travels with its block and, after N sends, is back home.
    dq, (dk, dv) = _loop(cfg, block, (dq0, dkv0), hop)
    if cfg.mode == "gather":  # every device holds a share of every key's gradient: sum and split
        dk, dv = (lax.psum_scatter(x, cfg.axis_name, scatter_dimension=1, tiled=True) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_attend.defvjp(_fwd, _bwd)
