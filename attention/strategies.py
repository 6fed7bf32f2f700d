"""Context parallelism: four ways to shard attention's sequence over a mesh axis, one driver.

Shape letters: the legend in `attention` (b t s n k h here). N devices on ``axis_name``, each
holding ``t = T/N`` tokens of every sequence (in any layout: positions travel with the tokens).

- ``ring``: K/V blocks travel the ring; memory O(T/N), communication overlapped with compute
  (`attention.driver`, mode ``ring``).
- ``allgather``: each layer gathers the whole sequence's K/V (at kv-head size: cheap with GQA)
  and the local queries attend to it; the backward reduce-scatters dK/dV. Holds one layer's full
  K/V per device.
- ``ulysses``: all-to-all from sequence-sharded to head-sharded (each device: the whole sequence,
  n/N query heads), local attention, and back. Needs the query heads divisible by N; kv heads
  fewer than N are replicated only as far as needed (each device gets whole GQA groups).
- ``hybrid``: Ulysses inside groups of ``ulysses_size`` adjacent devices (e.g. one host), the ring
  across groups: the all-to-all stays on the fast links, the ring crosses the slow ones.

Each keeps GQA native, any token layout, packed documents (segment ids and positions cross
shards with their tokens), causal skipping (from positions, in the kernels and between ring hops)
and an exact backward. `context_parallel_shard` is the per-device function (inside ``shard_map``);
`sharded_attention` takes global arrays and runs the ``shard_map`` itself.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from attention import axes, instrument
from attention.driver import DriverConfig, attend
from attention.kernel_table import get_kernel
from attention.kernels import AttentionError, choose_kernel
from attention.local_kernels import KernelSpec
from attention.masks import default_positions

STRATEGIES = ("ring", "allgather", "ulysses", "hybrid")


class RingError(AttentionError):
    """Inputs or a mesh that context-parallel attention cannot take; the message says what to change."""


def ulysses_heads(n: int, kh: int, group: int) -> int:
    """KV heads after replicating them as far as a Ulysses group of ``group`` devices needs.

    Each device takes ``n / group`` query heads, which must cover whole GQA groups of the
    (replicated) kv heads: the fewest copies ``r`` with ``group | kh·r`` (then ``kh·r | n``).
    Raises `RingError` when the query heads do not divide over the group.
    """
    if n % group:
        raise RingError(
            f"Ulysses over {group} devices needs the query heads ({n}) divisible by {group}: use hybrid with a "
            "smaller ulysses_size, or the ring."
        )
    kv = math.lcm(kh, group)  # divides n: both kh and group do
    return kv


def default_ulysses_size(size: int, n: int, limit: int = 8) -> int:
    """Hybrid's default group: the largest proper divisor of ``size`` up to ``limit`` (a GPU node's
    NVLink island) that divides the ``n`` query heads (1: a plain ring)."""
    return max((u for u in range(1, min(limit, size - 1) + 1) if size % u == 0 and n % u == 0), default=1)


def _groups(size: int, group: int):
    return None if group == size else [list(range(g * group, (g + 1) * group)) for g in range(size // group)]


def _to_heads(x, axis_name, groups):
    """``[b, t, H, ...]`` sequence-sharded → ``[b, U·t, H/U, ...]`` head-sharded within a group."""
    return lax.all_to_all(x, axis_name, 2, 1, axis_index_groups=groups, tiled=True)


def _to_sequence(x, axis_name, groups):
    """Inverse of `_to_heads`."""
    return lax.all_to_all(x, axis_name, 1, 2, axis_index_groups=groups, tiled=True)


def _gather_ids(x, axis_name, group, groups):
    """Token ids ``[b, t]`` of the group's devices, in the order `_to_heads` concatenates them."""
    y = jnp.broadcast_to(x[:, :, None], (*x.shape, group))
    return lax.all_to_all(y, axis_name, 2, 1, axis_index_groups=groups, tiled=True)[..., 0]


def context_parallel_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    *,
    strategy: str = "ring",
    axis_name: str = "sequence",
    ulysses_size: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    chunk_size: int = 512,
    kernel: str = "jnp",
    skip_masked: bool = True,
    counter: instrument.WorkCounter | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Context-parallel attention for one device; call inside ``jax.shard_map`` over ``axis_name``.

    Args:
        q: local ``[b, t, n, h]``; k, v: local ``[b, s, k, h]``; positions / segment ids int
            ``[b, t]`` / ``[b, s]``: the local tokens' global positions and documents.
        strategy: one of `STRATEGIES`.
        ulysses_size: hybrid's group (adjacent devices on the axis, dividing its size).
        causal, scale, chunk_size: as for `attention.attention`.
        kernel: local kernel (`attention.choose_kernel`).
        skip_masked: False computes and masks every hop and chunk pair (benchmarks only).
        counter: count executed hops and blocks into it (`attention.instrument`).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]`` over every device's keys.
    """
    if strategy not in STRATEGIES:
        raise RingError(f"unknown context-parallel strategy {strategy!r}: use one of {', '.join(STRATEGIES)}.")
    h = q.shape[-1]
    spec = KernelSpec(causal, float(h**-0.5 if scale is None else scale), chunk_size, skip_masked, counter)
    name = choose_kernel(kernel, head_dim=h, dtype=q.dtype)
    ints = [x.astype(jnp.int32) for x in (q_positions, kv_positions, q_segment_ids, kv_segment_ids)]
    if strategy == "ring":
        return attend(DriverConfig(name, spec, "ring", axis_name), q, k, v, *ints)
    if strategy == "allgather":
        return attend(DriverConfig(name, spec, "gather", axis_name), q, k, v, *ints)
    size = lax.axis_size(axis_name)
    group = size if strategy == "ulysses" else (ulysses_size or default_ulysses_size(size, q.shape[2]))
    if size % group:
        raise RingError(f"hybrid: ulysses_size {group} must divide the {size} devices of {axis_name!r}.")
    n, kh = q.shape[2], k.shape[2]
    kv = ulysses_heads(n, kh, group)
    if kv != kh:  # repeat each kv head next to itself: head j of the copy is original j // r
        k, v = (jnp.repeat(x, kv // kh, axis=2) for x in (k, v))
    groups = _groups(size, group)
    qh, kh_, vh = (_to_heads(x, axis_name, groups) for x in (q, k, v))
    ids = [_gather_ids(x, axis_name, group, groups) for x in ints]
    if group == size:
        out, lse = attend(DriverConfig(name, spec, "local"), qh, kh_, vh, *ids)
    else:
        out, lse = attend(DriverConfig(name, spec, "ring", axis_name, stride=group), qh, kh_, vh, *ids)
    return _to_sequence(out, axis_name, groups), _to_sequence(lse[..., None], axis_name, groups)[..., 0]


# Logical-axis mapping of a standalone call (no rules installed): the activation column of
# `sharding.rules.RULES_TABLE` for the names attention uses (a test keeps the two equal).
DEFAULT_RULES: dict[str, axes.Axes] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
}


def _rules():
    try:
        return axes.installed_rules()
    except axes.RulesError:
        return DEFAULT_RULES


def _specs(b: int, n: int, kh: int, sizes: dict[str, int], axis_name: str):
    """``shard_map`` specs ``(act [b,t,n,h], tok [b,t], stat [b,t,n])`` from the rules in force.

    Batch over the ``batch`` axes (which must divide it), the sequence over exactly
    ``axis_name``, heads over the ``heads`` axes when ``heads`` and ``kv_heads`` map alike and
    divide both counts (every shard then holds whole GQA groups), else replicated.
    """
    rules = _rules()
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
            f"context-parallel attention over {axis_name!r} needs the rules to shard 'length' over exactly that "
            f"axis; they give {t_ax}: fix the rules or pass axis_name."
        )
    if h_ax:
        raise RingError(f"context-parallel attention needs 'head_dim' unsharded; the rules shard it over {h_ax}.")
    head_ax = n_ax if n_ax == kh_ax and n % split(n_ax) == 0 and kh % split(kh_ax) == 0 else ()
    wanted = tuple(dict.fromkeys(n_ax + kh_ax))
    if head_ax != wanted and split(wanted) > 1:
        warnings.warn(
            f"context-parallel attention: {n} query / {kh} kv heads do not divide "
            f"{'×'.join(f'{a}={sizes[a]}' for a in wanted)}; heads are replicated over it.",
            stacklevel=4,
        )
    return (
        axes.to_spec((b_ax, t_ax, head_ax, ())),
        axes.to_spec((b_ax, t_ax)),
        axes.to_spec((b_ax, t_ax, head_ax)),
    )


def sharded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh,
    strategy: str = "ring",
    ulysses_size: int | None = None,
    causal: bool = True,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    chunk_size: int = 512,
    axis_name: str = "sequence",
    return_lse: bool = False,
    kernel: str = "jnp",
    skip_masked: bool = True,
    counter: instrument.WorkCounter | None = None,
):
    """Context-parallel attention on globally shaped arrays: `context_parallel_shard` under ``shard_map``.

    Specs come from the logical-axis rules the caller installed (``with sharding.axis_rules(mesh):``)
    or, with none installed, the default mapping (batch → data/fsdp, heads → tensor, length →
    ``axis_name``), keeping only the axes the mesh has. Arrays may already be sharded so or not.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]``; t and s multiples of the axis size.
        mesh: a mesh with an ``axis_name`` axis.
        strategy, ulysses_size: see `context_parallel_shard`.
        q_positions / kv_positions: int ``[b, t]`` / ``[b, s]``, default ``arange`` (pass layout
            positions for zigzag/striped, `attention.layout`).
        q_segment_ids / kv_segment_ids: int ``[b, t]`` / ``[b, s]``, both or neither.
        causal, scale, chunk_size, kernel, skip_masked, counter: as for `context_parallel_shard`.
        return_lse: also return the fp32 ``[b, t, n]`` LSE.

    Returns:
        ``out [b, t, n, h]`` (and ``lse``), sharded like the inputs.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    sizes = dict(mesh.shape)
    if axis_name not in sizes:
        raise RingError(
            f"context-parallel attention needs a mesh axis named {axis_name!r}; the mesh has {tuple(sizes)}."
        )
    if t % sizes[axis_name] or s % sizes[axis_name]:
        raise RingError(
            f"context-parallel attention over {sizes[axis_name]} '{axis_name}' shards needs query and key lengths "
            f"divisible by {sizes[axis_name]}; got {t} and {s}: pad the sequence (padding gets its own segment id) "
            "or change the mesh."
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise RingError("context-parallel attention: give both q_segment_ids and kv_segment_ids, or neither.")
    act, tok, stat = _specs(b, n, kh, sizes, axis_name)
    q_pos = default_positions(b, t) if q_positions is None else q_positions.astype(jnp.int32)
    kv_pos = default_positions(b, s) if kv_positions is None else kv_positions.astype(jnp.int32)
    q_seg = jnp.zeros((b, t), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    kv_seg = jnp.zeros((b, s), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    shard_fn = functools.partial(
        context_parallel_shard,
        strategy=strategy,
        axis_name=axis_name,
        ulysses_size=ulysses_size,
        causal=causal,
        scale=scale,
        chunk_size=chunk_size,
        kernel=kernel,
        skip_masked=skip_masked,
        counter=counter,
    )
    check = get_kernel(choose_kernel(kernel, head_dim=h, dtype=q.dtype)).checks_vma
    out, lse = jax.shard_map(
        shard_fn, mesh=mesh, in_specs=(act, act, act, tok, tok, tok, tok), out_specs=(act, stat), check_vma=check
    )(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out
