"""Dense reference attention: fp32 logits and softmax over the full ``[t, s]`` matrix.

Memory is O(t·s), so this is for tests and short sequences; it is the yardstick every
other implementation is checked against. Fully masked query rows return zeros (and an
LSE of −inf), the convention the blockwise and ring implementations share.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def reference_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Grouped-query attention without repeating K/V.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` with ``n`` divisible by ``k``.
        mask: bool ``[b, t, s]``.
        scale: logit multiplier (usually ``h ** -0.5``).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]``.
    """
    kv_heads = k.shape[2]
    q_btkgh = rearrange(q, "b t (k g) h -> b t k g h", k=kv_heads)
    # [b, k, g, t, s]: every group of query heads shares one kv head.
    logits = jnp.einsum("btkgh,bskh->bkgts", q_btkgh.astype(jnp.float32), k.astype(jnp.float32)) * scale
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->btkgh", p / jnp.where(denom > 0, denom, 1.0), v.astype(jnp.float32))
    lse = jnp.where(
        denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + row_max[..., 0], -jnp.inf
    )
    out = rearrange(out, "b t k g h -> b t (k g) h").astype(q.dtype)
    return out, rearrange(lse, "b k g t -> b t (k g)")
