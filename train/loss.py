"""Next-token cross-entropy computed in sequence chunks, so ``[seq, vocab]`` logits never exist.

At 1M tokens × 128,256 vocab the fp32 logits would be ~0.5 TB per sequence. `chunked_cross_entropy`
applies the output head to one chunk of positions at a time inside ``lax.scan`` and wraps each chunk in
``jax.checkpoint``, so neither the forward nor the backward keeps more than one chunk's logits alive.

Chunks are *strided*, not contiguous: with ``n = ceil(S / chunk)`` chunks, chunk ``j`` holds positions
``j, j + n, j + 2n, …``. When the sequence axis is sharded over the ``sequence`` mesh axis (ring
attention) every chunk then has an equal slice on every device, so the scan needs no communication;
contiguous chunks would each live on one device and force a gather. The loss is a sum over tokens,
so the order in which tokens are visited does not matter (and neither does the ring layout).

Shape letters: b batch, t position, c positions in one chunk, n chunks, d embed, v vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss(h_bcd: jax.Array, head_dv: jax.Array, targets_bc: jax.Array, mask_bc: jax.Array) -> jax.Array:
    """Masked cross-entropy summed over one chunk, fp32 from the logits on."""
    # bf16 inputs keep bf16 matmul speed; the accumulation and everything after it are fp32.
    logits_bcv = jnp.einsum("bcd,dv->bcv", h_bcd, head_dv, preferred_element_type=jnp.float32)  # [b, c, v]
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    target_logit_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
    return jnp.sum((lse_bc - target_logit_bc) * mask_bc)


def chunked_cross_entropy(
    hidden_btd: jax.Array,
    head_dv: jax.Array,
    targets_bt: jax.Array,
    mask_bt: jax.Array,
    chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of counted tokens.

    Args:
        hidden_btd: final-norm hidden states ``[b, t, d]`` (the model's ``return_hidden=True``
            output), in the compute dtype.
        head_dv: the output projection ``[d, v]`` (`model.lm_head_kernel`); cast to the hidden
            dtype for the matmul.
        targets_bt: int ``[b, t]`` next-token ids (any value where the mask is 0).
        mask_bt: ``[b, t]`` bool or float weights; 0 on padding and on tokens without a target.
        chunk: positions per chunk (≥ 1). ``t`` need not be a multiple: the tail is padded with
            masked positions. ``chunk ≥ t`` computes the loss in one piece.

    Returns:
        ``(loss_sum, count)``: fp32 scalars, ``Σ mask · CE`` and ``Σ mask``. The mean loss is
        ``loss_sum / max(count, 1)``; keeping the two apart lets gradient accumulation and
        multi-batch evaluation weight every token equally.
    """
    if chunk < 1:
        raise ValueError(f"loss chunk must be a positive number of positions, got {chunk}.")
    b, t, d = hidden_btd.shape
    mask_bt = mask_bt.astype(jnp.float32)
    count = jnp.sum(mask_bt)
    head_dv = head_dv.astype(hidden_btd.dtype)
    n = -(-t // chunk)  # number of chunks
    c = -(-t // n)  # positions per chunk (≤ chunk, and padding < n)
    pad = n * c - t
    if pad:
        hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
        mask_bt = jnp.pad(mask_bt, ((0, 0), (0, pad)))
    # Position p = i·n + j goes to chunk j, row i: [b, c·n] -> [b, c, n] -> scan over n.
    h_nbcd = jnp.moveaxis(hidden_btd.reshape(b, c, n, d), 2, 0)
    tgt_nbc = jnp.moveaxis(targets_bt.reshape(b, c, n), 2, 0).astype(jnp.int32)
    mask_nbc = jnp.moveaxis(mask_bt.reshape(b, c, n), 2, 0)

    # Remat: the backward recomputes each chunk's logits instead of storing n of them.
    chunk_loss = jax.checkpoint(_chunk_loss, policy=jax.checkpoint_policies.nothing_saveable)

    def body(total, xs):
        h_bcd, tgt_bc, m_bc = xs
        return total + chunk_loss(h_bcd, head_dv, tgt_bc, m_bc), None

    loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_nbcd, tgt_nbc, mask_nbc))
    return loss_sum, count


def full_cross_entropy(
    hidden_btd: jax.Array, head_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The same sums with the whole ``[b, t, v]`` logits at once (short sequences, tests)."""
    mask_bt = mask_bt.astype(jnp.float32)
    loss = _chunk_loss(hidden_btd, head_dv.astype(hidden_btd.dtype), targets_bt.astype(jnp.int32), mask_bt)
    return loss, jnp.sum(mask_bt)
