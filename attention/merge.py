"""Merging partial attention results by log-sum-exp (the online-softmax combine rule).

Two results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine into
the result over their union::

    lse = logaddexp(lse_a, lse_b);  out = out_a·exp(lse_a − lse) + out_b·exp(lse_b − lse)

in fp32. A side that saw no key has ``lse = −inf`` and weight 0; if neither did, the merged
row stays zeros with ``lse = −inf``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_partials(
    out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Combine two partial results.

    Args:
        out_a, out_b: ``[b, t, n, h]`` partial outputs (each normalised over its own keys).
        lse_a, lse_b: fp32 ``[b, t, n]`` log-sum-exp of each part's logits.

    Returns:
        fp32 ``out [b, t, n, h]`` and ``lse [b, t, n]`` over the union of both key sets.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # -inf - -inf would be NaN
    w_a = jnp.exp(lse_a - safe)[..., None]
    w_b = jnp.exp(lse_b - safe)[..., None]
    return out_a.astype(jnp.float32) * w_a + out_b.astype(jnp.float32) * w_b, lse
