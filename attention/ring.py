"""Ring attention: the sequence is sharded over a mesh axis and K/V blocks travel around it.

Shape letters: the legend in `attention` (b t s n k h here).

Each of the N shards keeps its query block and, over N hops, sees every shard's K/V block:
at hop i shard r holds the block that started on shard ``r − i``. Per hop:

- the next hop's ``lax.ppermute`` (K, V, their positions and segment ids; only the kv heads,
  GQA is never expanded on the wire) is issued *before* this hop's compute, so XLA can
  overlap communication with work;
- a hop whose KV block is entirely hidden from the query block (causal future, disjoint
  documents; decided from the blocks' position/segment ranges) runs its chunk loops zero
  times: skipped, not computed and masked. Inside a hop, chunk pairs are skipped the same
  way (`attention.flash`), which is what balances the zigzag and striped layouts
  (`attention.layout`);
- the hop's keys simply continue each query chunk's online softmax: the unnormalised fp32
  state ``(acc, max, denominator)`` is carried from hop to hop (the LSE merge fused into the
  chunk loop, in place) and normalised once after the last hop. Queries, K/V blocks and
  accumulators stay in the chunk-major layout of `attention.flash` for the whole ring.

The backward is a hand-written ``jax.custom_vjp`` fed with the *global* output and LSE: it
runs the ring again, recomputing each hop's probabilities, and sends a dK/dV accumulator
around the ring together with the K/V block it belongs to; after the last hop one more
``ppermute`` brings every accumulator home. Differentiating through the merges is never done.

`ring_attention_shard` is the per-shard function (call it inside ``jax.shard_map``);
`sharded_attention` takes globally shaped arrays and runs the ``shard_map`` itself.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

from attention import axes, instrument
from attention.flash import (
    ChunkConfig,
    block_is_masked,
    finalize,
    flash_backward,
    flash_forward,
    init_state,
    kv_chunks,
    kv_unchunk,
    pad_keys,
    pad_queries,
    q_chunks,
    q_unchunk,
    stat_chunks,
    stat_unchunk,
    token_chunks,
    vary_like,
)
from attention.kernels import AttentionError, choose_kernel
from attention.masks import default_positions
from attention.pallas_attention import PallasConfig, ring_pallas_shard


class RingError(AttentionError):
    """Inputs or a mesh that ring attention cannot take; the message says what to change."""


@dataclass(frozen=True)
class _RingConfig:
    axis_name: str
    chunk: ChunkConfig  # chunk.skip_masked also switches hop skipping


def _ring_chunk(chunk_size: int, local_len: int) -> int:
    # A chunk never spans both zigzag halves of a shard (one early, one late chunk of the
    # sequence), so causal chunk skipping can balance the work; halving a short block costs little.
    half = local_len // 2 if local_len % 2 == 0 and local_len > 1 else local_len
    return max(1, min(chunk_size, half))


def ring_attention_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    axis_name: str = "sequence",
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int = 512,
    skip_future_hops: bool = True,
    kernel: str = "jnp",
    counter: instrument.WorkCounter | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Ring attention for one shard; call inside ``jax.shard_map`` over ``axis_name``.

    Args:
        q: local ``[b, t, n, h]``; k, v: local ``[b, s, k, h]`` (the shard's K/V block).
        q_positions / kv_positions: int ``[b, t]`` / ``[b, s]`` global positions of the local
            tokens (any layout); q_segment_ids / kv_segment_ids: int, both or neither.
        axis_name: the ring's mesh axis.
        causal, scale, chunk_size: as for `attention.blockwise.blockwise_attention`.
        skip_future_hops: False gives the classic ring (every hop and chunk pair computed
            and masked), for benchmarks.
        kernel: per-hop kernel: ``jnp`` (these chunk loops), ``pallas``
            (`attention.pallas_attention.ring_pallas_shard`) or ``auto`` (`attention.choose_kernel`).
        counter: count executed hops and blocks into it (`attention.instrument`; None: no callbacks).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]`` over all shards' keys.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    q_pos, kv_pos = q_positions.astype(jnp.int32), kv_positions.astype(jnp.int32)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise RingError("ring attention: give both q_segment_ids and kv_segment_ids, or neither.")
    q_seg = jnp.zeros_like(q_pos) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros_like(kv_pos) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    if choose_kernel(kernel, head_dim=h) != "jnp":
        cfg = PallasConfig.for_chunk(causal, h**-0.5 if scale is None else scale, chunk_size, counter)
        return ring_pallas_shard(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg, axis_name, skip_future_hops)
    chunk = ChunkConfig(
        causal=causal,
        scale=float(h**-0.5 if scale is None else scale),
        q_chunk=_ring_chunk(chunk_size, t),
        kv_chunk=_ring_chunk(chunk_size, s),
        skip_masked=skip_future_hops,
        counter=counter,
    )
    q, q_pos, q_seg = pad_queries(q, q_pos, q_seg, chunk.q_chunk)
    k, v, kv_pos, kv_seg = pad_keys(k, v, kv_pos, kv_seg, chunk.kv_chunk)
    out, lse = _ring(_RingConfig(axis_name, chunk), q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out[:, :t], lse[:, :t]


def _shift(x, axis_name: str, size: int):
    """Send ``x`` (a pytree) one step along the ring: shard r → r + 1."""
    return lax.ppermute(x, axis_name, [(r, (r + 1) % size) for r in range(size)])


def _ring_loop(cfg: _RingConfig, block, state, hop):
    """Run ``state = hop(block_i, state)`` over the N hops, prefetching block i+1 before hop i.

    ``hop`` returns ``(state, travelling)``: ``travelling`` (or None) is sent on after the hop
    together with the block it belongs to (the backward's dK/dV accumulator).
    """
    size = lax.axis_size(cfg.axis_name)

    def step(carry, last: bool):
        block, state, travel = carry
        nxt = None if last else _shift(block, cfg.axis_name, size)  # in flight during the compute
        state, travel = hop(block, state, travel)
        if travel is not None and size > 1:
            travel = _shift(travel, cfg.axis_name, size)
        return nxt, state, travel

    carry = (block, *state)
    if size > 1:  # hops 0 .. N-2 prefetch the next block; the last hop has nothing left to fetch
        carry, _ = lax.scan(lambda c, _: (step(c, last=False), None), carry, None, length=size - 1)
    carry = step(carry, last=True)
    return carry[1], carry[2]


def _hop_active(cfg: _RingConfig, q_pos, kv_pos, q_seg, kv_seg):
    """Traced bool: this hop's KV block is not entirely hidden from the query block (None: always run).

    A hidden hop runs its chunk loops zero times: no compute, and, unlike a ``lax.cond``, no
    second copy of the full-size output / gradient accumulators.
    """
    if not cfg.chunk.skip_masked:
        return None
    return ~block_is_masked(q_pos, kv_pos, q_seg, kv_seg, cfg.chunk.causal)


def _chunked(cfg: _RingConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """Chunk-major copies: queries stay, the K/V block travels the ring in this layout."""
    kh, cq, ck = k.shape[2], cfg.chunk.q_chunk, cfg.chunk.kv_chunk
    queries = (q_chunks(q, kh, cq), token_chunks(q_pos, cq), token_chunks(q_seg, cq))
    block = (kv_chunks(k, ck), kv_chunks(v, ck), token_chunks(kv_pos, ck), token_chunks(kv_seg, ck))
    return queries, block


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _RingConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _ring_forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _ring_forward(cfg: _RingConfig, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    index = lax.axis_index(cfg.axis_name)
    (qc, qpc, qsc), block = _chunked(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    def hop(block, state, _):
        kb, vb, kpb, ksb = block
        active = _hop_active(cfg, qpc, kpb, qsc, ksb)
        instrument.record(cfg.chunk.counter, "hop_fwd", index, when=active)
        # The online softmax simply continues over this hop's keys: the LSE merge is fused in.
        return flash_forward(qc, kb, vb, qpc, kpb, qsc, ksb, cfg.chunk, index, state, active=active), None

    state, _ = _ring_loop(cfg, block, (init_state(qc, *block, qpc, qsc), None), hop)
    out, lse = finalize(state)
    return q_unchunk(out, cfg.chunk.q_chunk).astype(q.dtype), stat_unchunk(lse, cfg.chunk.q_chunk)


def _ring_fwd(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _ring_forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(cfg, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    index = lax.axis_index(cfg.axis_name)
    kh, cq = k.shape[2], cfg.chunk.q_chunk
    # Global output and LSE: p = exp(s - lse) are the final probabilities on every hop.
    delta = stat_chunks(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse, kh, cq)
    lse = stat_chunks(jnp.where(jnp.isfinite(lse), lse, 0.0), kh, cq)  # rows that saw nothing: any finite shift
    doc = q_chunks(d_out, kh, cq)
    (qc, qpc, qsc), block = _chunked(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    dq0 = vary_like(jnp.zeros(qc.shape, jnp.float32), qc, *block, qpc, qsc, doc, delta, lse)
    dkv0 = (jnp.zeros_like(dq0, shape=block[0].shape), jnp.zeros_like(dq0, shape=block[1].shape))

    def hop(block, dq, dkv):
        kb, vb, kpb, ksb = block
        active = _hop_active(cfg, qpc, kpb, qsc, ksb)
        instrument.record(cfg.chunk.counter, "hop_bwd", index, when=active)
        dq, dk, dv = flash_backward(
            qc, kb, vb, qpc, kpb, qsc, ksb, doc, lse, delta, cfg.chunk, index, dq, *dkv, active=active
        )
        return dq, (dk, dv)

    # The dK/dV accumulator travels with its block and, after N sends, is back on its own shard.
    dq, (dk, dv) = _ring_loop(cfg, block, (dq0, dkv0), hop)
    dq = q_unchunk(dq, cq).astype(q.dtype)
    return dq, kv_unchunk(dk).astype(k.dtype), kv_unchunk(dv).astype(v.dtype), None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def sharded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    chunk_size: int = 512,
    skip_future_hops: bool = True,
    axis_name: str = "sequence",
    return_lse: bool = False,
    kernel: str = "jnp",
    counter: instrument.WorkCounter | None = None,
):
    """Ring attention on globally shaped arrays: runs `ring_attention_shard` under ``jax.shard_map``.

    The ``shard_map`` specs come from the logical-axis rules the caller installed
    (``with sharding.axis_rules(mesh):``; `attention.axes`): batch over the ``batch`` axes
    (``data``, ``fsdp``), the sequence over ``axis_name`` (the ``length`` rule) and heads over the
    ``heads`` axes (``tensor``) when both head counts divide them; otherwise heads are replicated
    with a warning. Arrays may already be sharded so or not (jit reshards them; mesh axes are Auto).

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]``; t and s multiples of the ring size.
        mesh: a mesh with an ``axis_name`` axis (`sharding.make_mesh`), its rules installed
            (`attention.axes.RulesError` otherwise).
        q_positions / kv_positions: int ``[b, t]`` / ``[b, s]``, default ``arange`` (tokens
            in natural order; pass layout positions for zigzag/striped, `attention.layout`).
        q_segment_ids / kv_segment_ids: int ``[b, t]`` / ``[b, s]``, both or neither.
        causal, scale, chunk_size, skip_future_hops: as for `ring_attention_shard`.
        return_lse: also return the fp32 ``[b, t, n]`` LSE.
        kernel: per-hop kernel, as for `ring_attention_shard`.
        counter: count executed hops and blocks into it (`attention.instrument`; None: no callbacks).

    Returns:
        ``out [b, t, n, h]`` (and ``lse``), sharded like the inputs.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    sizes = dict(mesh.shape)
    if axis_name not in sizes:
        raise RingError(f"ring attention needs a mesh axis named {axis_name!r}; the mesh has {tuple(sizes)}.")
    ring = sizes[axis_name]
    if t % ring or s % ring:
        raise RingError(
            f"ring attention over {ring} '{axis_name}' shards needs query and key lengths divisible by {ring}; "
            f"got {t} and {s}: pad the sequence (padding gets its own segment id) or change the mesh."
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise RingError("ring attention: give both q_segment_ids and kv_segment_ids, or neither.")
    act, tok, stat = _ring_specs(b, n, kh, sizes, axis_name)
    q_pos = default_positions(b, t) if q_positions is None else q_positions.astype(jnp.int32)
    kv_pos = default_positions(b, s) if kv_positions is None else kv_positions.astype(jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)

    shard_fn = functools.partial(
        ring_attention_shard,
        axis_name=axis_name,
        causal=causal,
        scale=scale,
        chunk_size=chunk_size,
        skip_future_hops=skip_future_hops,
        kernel=kernel,
        counter=counter,
    )
    # Pallas's interpret mode does not type its loops' manual axes (jax 0.10), so the Pallas ring
    # runs unchecked; the jnp ring keeps the check.
    check = choose_kernel(kernel, head_dim=h) == "jnp"
    out, lse = jax.shard_map(
        shard_fn, mesh=mesh, in_specs=(act, act, act, tok, tok, tok, tok), out_specs=(act, stat), check_vma=check
    )(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out


def _ring_specs(b: int, n: int, kh: int, sizes: dict[str, int], axis_name: str):
    """``shard_map`` specs ``(act [b,t,n,h], tok [b,t], stat [b,t,n])`` from the installed rules.

    The rules' ``batch`` axes must divide the batch, ``length`` must be exactly the ring axis and
    ``head_dim`` unsharded; heads shard only when ``heads`` and ``kv_heads`` map to the same axes
    and those divide both head counts (every shard then holds whole GQA groups), else they are
    replicated with a warning.
    """
    rules = axes.installed_rules()
    b_ax, t_ax, n_ax, h_ax = axes.resolve(("batch", "length", "heads", "head_dim"), rules, sizes)
    (kh_ax,) = axes.resolve(("kv_heads",), rules, sizes)
    split = lambda ax: math.prod(sizes[a] for a in ax)  # noqa: E731
    if b % split(b_ax):
        raise RingError(
            f"batch {b} is not divisible by the {split(b_ax)} {'×'.join(b_ax)} shards of the mesh: "
            "change the batch or mesh."
        )
    if t_ax != (axis_name,):
        raise RingError(
            f"ring attention over {axis_name!r} needs the installed rules to shard 'length' over exactly that "
            f"axis; they give {t_ax}: fix the rules or pass axis_name."
        )
    if h_ax:
        raise RingError(f"ring attention needs 'head_dim' unsharded; the installed rules shard it over {h_ax}.")
    head_ax = n_ax if n_ax == kh_ax and n % split(n_ax) == 0 and kh % split(kh_ax) == 0 else ()
    if head_ax != n_ax or head_ax != kh_ax:
        wanted = tuple(dict.fromkeys(n_ax + kh_ax))
        if split(wanted) > 1:
            warnings.warn(
                f"ring attention: {n} query / {kh} kv heads do not divide {'×'.join(wanted)}={split(wanted)}; "
                "heads are replicated over it.",
                stacklevel=3,
            )
    return (
        axes.to_spec((b_ax, t_ax, head_ax, ())),
        axes.to_spec((b_ax, t_ax)),
        axes.to_spec((b_ax, t_ax, head_ax)),
    )
