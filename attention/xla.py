"""``jax.nn.dot_product_attention``: XLA's fused attention on CPU/TPU, cuDNN flash attention on GPU.

cuDNN only takes a causal flag and sequence lengths, not an arbitrary mask, so the
position/segment mask is passed only when it is needed; with plain causal positions the
``is_causal`` path lets cuDNN run its flash kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    scale: float,
    *,
    is_causal: bool = False,
    implementation: str | None = None,
) -> jax.Array:
    """q ``[b, t, n, h]``, k/v ``[b, s, k, h]``, optional bool mask ``[b, t, s]`` → ``[b, t, n, h]``."""
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if mask is None else mask[:, None, :, :],
        scale=scale,
        is_causal=is_causal,
        implementation=implementation,
    )
    if mask is not None:
        # Rows with nothing to attend to give zeros, like every other implementation.
        out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0)
    return out
