"""Next-token cross-entropy computed in sequence chunks, so ``[seq, vocab]`` logits never exist.

The one chunked loss: training sums it (`chunked_cross_entropy`), perplexity evals read it per
position (`chunked_token_nll`); both visit the same strided chunks through the same head math.

At 1M tokens × 128,256 vocab the fp32 logits would be ~0.5 TB per sequence. `chunked_cross_entropy`
applies the output head to one chunk of positions at a time inside ``lax.scan`` and wraps each chunk in
``jax.checkpoint``, so neither the forward nor the backward keeps more than one chunk's logits alive.

Chunks are *strided*, not contiguous: with ``n = ceil(S / chunk)`` chunks, chunk ``j`` holds positions
``j, j + n, j + 2n, …``. When the sequence axis is sharded over the ``sequence`` mesh axis (ring
attention) every chunk then has an equal slice on every device, so the scan needs no communication;
contiguous chunks would each live on one device and force a gather. The loss is a sum over tokens,
so the order in which tokens are visited does not matter (and neither does the ring layout).

Shape letters (the legend in `attention`): b batch, t position, c positions in one chunk, j chunks, d embed, v vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention import axes


def _constrain(x: jax.Array, names: tuple, mesh) -> jax.Array:
    # Under the rules the caller installed (`sharding.axis_rules`), as the model's activations;
    # without a mesh there is nothing to shard, and a mesh without rules raises.
    return x if mesh is None else axes.constrain(x, names, mesh)


def _chunk_nll(h_bcd: jax.Array, head_dv: jax.Array, targets_bc: jax.Array, mesh=None) -> jax.Array:
    """Next-token NLL ``[b, c]`` of one chunk, fp32 from the logits on."""
    # The head is cast here, per chunk, not once outside the scan: the scan then sums the head's
    # gradient over chunks in the head's own dtype (fp32 master weights), not in bf16.
    # bf16 inputs keep bf16 matmul speed; the accumulation and everything after it are fp32.
    head_dv = head_dv.astype(h_bcd.dtype)
    logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, head_dv, preferred_element_type=jnp.float32)  # [b, c, v]
    logits_bcv = _constrain(logits_bcv, ("batch", "length", "vocab"), mesh)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    # A compare-and-sum rather than a gather: with the vocab sharded over `tensor` each device picks
    # from its own slice and one [b, c] all-reduce combines them (a gather would collect the logits).
    vocab_v = jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32)
    target_logit_bc = jnp.sum(jnp.where(vocab_v == targets_bc[..., None], logits_bcv, 0.0), axis=-1)
    return lse_bc - target_logit_bc


def _chunk_loss(
    h_bcd: jax.Array, head_dv: jax.Array, targets_bc: jax.Array, mask_bc: jax.Array, mesh=None
) -> jax.Array:
    """Masked cross-entropy summed over one chunk."""
    return jnp.sum(_chunk_nll(h_bcd, head_dv, targets_bc, mesh) * mask_bc)


def _strided(x: jax.Array, n: int, c: int) -> jax.Array:
    """``[b, t, ...]`` → ``[b, c, j, ...]`` (zero-padded to ``c·n``): position ``p = i·n + j`` at ``[:, i, j]``."""
    pad = n * c - x.shape[1]
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(x.shape[0], c, n, *x.shape[2:])


def _layout(t: int, chunk: int) -> tuple[int, int]:
    """``(n chunks, c positions per chunk)`` for ``t`` positions and at most ``chunk`` per chunk."""
    if chunk < 1:
        raise ValueError(f"loss chunk must be a positive number of positions, got {chunk}.")
    n = -(-t // chunk)
    return n, -(-t // n)  # c ≤ chunk, and the padding n·c − t < n


def chunked_cross_entropy(
    hidden_btd: jax.Array,
    head_dv: jax.Array,
    targets_bt: jax.Array,
    mask_bt: jax.Array,
    chunk: int,
    mesh=None,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of counted tokens.

    Args:
        hidden_btd: final-norm hidden states ``[b, t, d]`` (the model's ``return_hidden=True``
            output), in the compute dtype.
        head_dv: the output projection ``[d, v]`` (`model.lm_head_kernel`); cast to the hidden
            dtype for each chunk's matmul, its gradient summed over chunks in its own dtype.
        targets_bt: int ``[b, t]`` next-token ids (any value where the mask is 0).
        mask_bt: ``[b, t]`` bool or float weights; 0 on padding and on tokens without a target.
        chunk: positions per chunk (≥ 1). ``t`` need not be a multiple: the tail is padded with
            masked positions. ``chunk ≥ t`` computes the loss in one piece. With the sequence
            sharded, keep ``ceil(t / ceil(t / chunk))`` divisible by the ``sequence`` axis size so
            every chunk splits evenly over the ring.
        mesh: when given, the chunked hidden states and each chunk's logits are pinned to the rules
            table's activation shardings (batch over data/fsdp, positions over ``sequence``, vocab
            over ``tensor``), so neither the forward nor the backward reshuffles them per chunk.

    Returns:
        ``(loss_sum, count)``: fp32 scalars, ``Σ mask · CE`` and ``Σ mask``. The mean loss is
        ``loss_sum / max(count, 1)``; keeping the two apart lets gradient accumulation and
        multi-batch evaluation weight every token equally.
    """
    b, t, d = hidden_btd.shape
    n, c = _layout(t, chunk)
    mask_bt = mask_bt.astype(jnp.float32)
    count = jnp.sum(mask_bt)
    # Position p = i·n + j goes to chunk j, row i: [b, c·j] -> [b, c, j]; step j slices [:, :, j] in place
    # (a dynamic slice, not a transposed copy of the hidden states; the backward writes the hidden
    # gradient chunk by chunk into one buffer the same way).
    h_bcjd = _constrain(_strided(hidden_btd, n, c), ("batch", "length", None, "embed"), mesh)
    tgt_bcj = _strided(targets_bt, n, c).astype(jnp.int32)
    mask_bcj = _strided(mask_bt, n, c)

    # Remat: the backward recomputes each chunk's logits instead of storing n of them.
    chunk_loss = jax.checkpoint(_chunk_loss, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(4,))

    def body(total, j):
        h_bcd, tgt_bc, m_bc = (
            jax.lax.dynamic_index_in_dim(x, j, axis=2, keepdims=False) for x in (h_bcjd, tgt_bcj, mask_bcj)
        )
        h_bcd = _constrain(h_bcd, ("batch", "length", "embed"), mesh)
        return total + chunk_loss(h_bcd, head_dv, tgt_bc, m_bc, mesh), None

    loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(n))
    return loss_sum, count


def chunked_token_nll(
    hidden_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, chunk: int, mesh=None
) -> jax.Array:
    """Per-position next-token NLL ``[b, t]`` (fp32), through the same strided chunks as `chunked_cross_entropy`.

    Args:
        hidden_btd: final-norm hidden states ``[b, t, d]``.
        head_dv: the output projection ``[d, v]``.
        targets_bt: int ``[b, t]`` next-token ids (positions without one: any id, ignore their NLL).
        chunk: positions per chunk (≥ 1); the sharding advice of `chunked_cross_entropy` applies.
        mesh: as for `chunked_cross_entropy`.

    Returns:
        ``[b, t]`` fp32: ``logsumexp(logits) − logits[target]`` at every position. Forward only
        (evaluation): no remat, one chunk's logits alive at a time.
    """
    b, t, d = hidden_btd.shape
    n, c = _layout(t, chunk)
    h_bcjd = _constrain(_strided(hidden_btd, n, c), ("batch", "length", None, "embed"), mesh)
    tgt_bcj = _strided(targets_bt, n, c).astype(jnp.int32)

    def body(_, j):
        h_bcd, tgt_bc = (jax.lax.dynamic_index_in_dim(x, j, axis=2, keepdims=False) for x in (h_bcjd, tgt_bcj))
        h_bcd = _constrain(h_bcd, ("batch", "length", "embed"), mesh)
        return None, _chunk_nll(h_bcd, head_dv, tgt_bc, mesh)

    _, nll_nbc = jax.lax.scan(body, None, jnp.arange(n))  # [n, b, c]
    # Back to position order p = i·n + j: [n, b, c] -> [b, c, n] -> [b, c·n].
    return nll_nbc.transpose(1, 2, 0).reshape(b, n * c)[:, :t]


def full_cross_entropy(
    hidden_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The same sums with the whole ``[b, t, v]`` logits at once (short sequences, tests)."""
    mask_bt = mask_bt.astype(jnp.float32)
    loss = _chunk_loss(hidden_btd, head_dv, targets_bt.astype(jnp.int32), mask_bt)
    return loss, jnp.sum(mask_bt)
