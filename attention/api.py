"""The one attention entry point: `attention(q, k, v, ...)` dispatching to an implementation.

Implementations (``impl``):
- ``reference``: dense fp32 softmax (tests, short sequences);
- ``xla``: ``jax.nn.dot_product_attention`` with ``is_causal`` and no mask (cuDNN flash attention
  on GPU). Only default positions without segment ids have a form it takes without a dense mask;
  explicit positions or segment ids fall back to ``blockwise`` (the fused local kernel);
- ``blockwise``: flash attention over the local sequence with a custom VJP, O(S·d) memory;
- ``ring``, ``allgather``, ``ulysses``, ``hybrid``: context parallelism over the ``sequence``
  mesh axis (needs ``mesh``; `attention.strategies`): K/V travel a ring, K/V are gathered,
  heads and sequence are swapped by all-to-all, or all-to-all inside groups of ``ulysses_size``
  devices with a ring across them;
- ``auto``: ``ring`` on a mesh whose ``sequence`` axis is > 1 (the one strategy that keeps memory
  O(S/N) at any length; `sharding plan` recommends another where it is faster and fits, and a
  training run's ``model.context_parallel: auto`` applies that recommendation), else the fastest
  exact one-device choice for the platform and shapes (see `choose_impl`).

The local kernel of every implementation but ``reference`` and ``xla`` (``kernel``): ``jnp``
(chunk loops in plain JAX, `attention.flash`), a Pallas kernel (``pallas`` = the target's:
``mosaic_tpu``, ``mosaic_gpu`` or ``triton``; interpreted on CPU) or ``auto`` (`choose_kernel`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from attention.blockwise import blockwise_attention
from attention.kernels import KERNELS, AttentionError, choose_kernel, current_target
from attention.masks import default_positions, make_mask
from attention.reference import reference_attention
from attention.strategies import STRATEGIES, sharded_attention
from attention.xla import xla_attention

__all__ = ["IMPLS", "KERNELS", "AttentionError", "attention", "choose_impl", "choose_kernel", "ring_problem"]

IMPLS = ("auto", "reference", "xla", "blockwise", *STRATEGIES)
# Below this many keys the dense matrix is cheap and XLA fuses it well on CPU.
_DENSE_MAX_KEYS = 1024


def ring_problem(q: jax.Array, k: jax.Array, mesh) -> str | None:
    """Why context-parallel attention cannot shard these inputs over ``mesh`` (None when it can)."""
    ring = dict(mesh.shape).get("sequence", 1)
    if q.shape[1] % ring or k.shape[1] % ring:
        return (
            f"query/key lengths {q.shape[1]}/{k.shape[1]} are not divisible by the {ring} 'sequence' shards "
            "(pad the sequence or change the mesh)"
        )
    return None


def choose_impl(q: jax.Array, k: jax.Array, mesh=None, platform: str | None = None) -> str:
    """The implementation ``impl="auto"`` resolves to.

    A mesh with a ``sequence`` axis of size > 1 means the sequence is sharded: ring (or, if
    the lengths cannot be split over it, blockwise; `attention` warns). On GPU the cuDNN
    kernel (through ``xla``) is fastest when the head size is one cuDNN supports (inputs with
    explicit positions or segment ids then run blockwise on the Pallas kernel); elsewhere
    short sequences go dense and long ones blockwise.
    """
    if mesh is not None and dict(mesh.shape).get("sequence", 1) > 1:
        return "ring" if ring_problem(q, k, mesh) is None else "blockwise"
    platform = platform or current_target().platform
    if platform == "gpu" and q.shape[-1] in (64, 128) and q.dtype in (jnp.bfloat16, jnp.float16):
        return "xla"
    return "reference" if k.shape[1] <= _DENSE_MAX_KEYS else "blockwise"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    impl: str = "auto",
    scale: float | None = None,
    mesh=None,
    chunk_size: int = 512,
    kernel: str = "auto",
    ulysses_size: int | None = None,
) -> jax.Array:
    """Grouped-query attention with masks from positions and segment ids.

    Args:
        q: ``[b, t, n, h]`` queries.
        k, v: ``[b, s, k, h]`` keys/values with ``n % k == 0`` (K/V are never repeated).
        causal: hide keys whose position is later than the query's.
        segment_ids: int ``[b, t]``; tokens attend only within their segment. For
            self-attention it also serves the keys unless ``kv_segment_ids`` is given.
        q_positions, kv_positions: int32 ``[b, t]`` / ``[b, s]`` global positions
            (default ``arange``); a sequence shard passes its own.
        impl: ``auto | reference | xla | blockwise | ring | allgather | ulysses | hybrid``.
            ``xla`` with explicit positions or segment ids runs ``blockwise`` (cuDNN takes
            neither without a dense mask).
        scale: logit multiplier, default ``h ** -0.5``.
        mesh: required for the context-parallel impls (a mesh with a ``sequence`` axis). Specs
            follow the logical-axis rules the caller installed, or with none the default
            mapping (batch → data/fsdp, heads → tensor, length → sequence).
        chunk_size: KV (and query) chunk of the local kernel (the largest tile of a Pallas one).
        kernel: local kernel: ``auto | jnp | pallas | mosaic_tpu | mosaic_gpu | triton`` (`choose_kernel`).
        ulysses_size: ``hybrid`` only: devices per Ulysses group (adjacent on ``sequence``).

    Returns:
        ``[b, t, n, h]`` in q's dtype. Query rows with no visible key are zeros.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.ndim != 4 or k.shape[0] != b or k.shape[3] != h:
        raise AttentionError(
            f"k and v must be [batch, seq, kv_heads, {h}] matching q {q.shape}; got {k.shape}, {v.shape}."
        )
    if n % k.shape[2]:
        raise AttentionError(f"query heads ({n}) must be a multiple of kv heads ({k.shape[2]}).")
    if impl not in IMPLS:
        raise AttentionError(f"unknown attention impl {impl!r}: use one of {', '.join(IMPLS)}.")
    s = k.shape[1]
    scale = h**-0.5 if scale is None else scale
    kernel = choose_kernel(kernel, head_dim=h, dtype=q.dtype)
    # Only arange positions in one document have a mask-free form (is_causal). With t != s the
    # corner a causal flag aligns to is not the same on every backend, so that case, like
    # explicit positions and segment ids, takes the fused local kernel.
    xla_plain = q_positions is None and kv_positions is None and segment_ids is None and kv_segment_ids is None
    xla_plain = xla_plain and (t == s or not causal)
    q_positions = default_positions(b, t) if q_positions is None else q_positions.astype(jnp.int32)
    kv_positions = default_positions(b, s) if kv_positions is None else kv_positions.astype(jnp.int32)
    if kv_segment_ids is None and segment_ids is not None and s == t:
        kv_segment_ids = segment_ids
    if (segment_ids is None) != (kv_segment_ids is None):
        raise AttentionError("give segment ids for both queries and keys (kv_segment_ids when their lengths differ).")
    if impl == "auto":
        impl = choose_impl(q, k, mesh)
        if impl == "blockwise" and mesh is not None and (problem := ring_problem(q, k, mesh)):
            warnings.warn(f"attention: falling back from ring to blockwise attention: {problem}.", stacklevel=2)

    sequence = dict(mesh.shape).get("sequence", 0) if mesh is not None else 0
    if impl == "blockwise" and kernel != "jnp" and sequence == 1:
        # A Pallas call cannot be partitioned automatically over the mesh's batch/head axes: run it
        # per device under shard_map, as a context-parallel call whose ring is one device (one hop).
        impl = "ring"

    if impl == "xla":
        if xla_plain:
            return xla_attention(q, k, v, scale, is_causal=causal)
        impl = "blockwise"

    if impl in STRATEGIES:
        if mesh is None:
            raise AttentionError(f"impl={impl!r} needs mesh=: a jax Mesh with a 'sequence' axis.")
        if problem := ring_problem(q, k, mesh):
            raise AttentionError(f"impl={impl!r} cannot run: {problem}; impl='auto' falls back to blockwise.")
        return sharded_attention(
            q,
            k,
            v,
            mesh=mesh,
            strategy=impl,
            ulysses_size=ulysses_size,
            causal=causal,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            scale=scale,
            chunk_size=chunk_size,
            kernel=kernel,
        )
    if impl == "blockwise":
        out, _ = blockwise_attention(
            q,
            k,
            v,
            q_positions=q_positions,
            kv_positions=kv_positions,
            q_segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            causal=causal,
            scale=scale,
            chunk_size=chunk_size,
            kernel=kernel,
        )
        return out
    mask = make_mask(q_positions, kv_positions, segment_ids, kv_segment_ids, causal)
    return reference_attention(q, k, v, mask, scale)[0]
