"""``jax.nn.dot_product_attention`` without a mask: cuDNN flash attention on GPU, XLA's fused attention elsewhere.

`attention.attention` sends only inputs that need no mask here (default positions, one
document): causality is the ``is_causal`` flag, so on GPU cuDNN runs its flash kernel, which
skips the causal future and never builds a ``[t, s]`` mask. cuDNN takes nothing else without a
dense mask — JAX exposes only per-batch sequence lengths and a sliding window, neither of which
expresses arbitrary positions or packed segment ids — so those inputs go to the fused local
kernel (``blockwise``) instead. Off GPU, or for dtypes/head sizes cuDNN does not take, JAX's
XLA implementation runs (it materialises the logits: O(t·s), for short sequences only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention.kernels import current_target

# cuDNN's flash attention (through jax.nn.dot_product_attention) takes half-precision inputs with
# head sizes that are multiples of 8 up to 128 (256 on newer releases; 128 is safe everywhere).
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_supported(q: jax.Array, platform: str | None = None) -> bool:
    """Whether ``implementation="cudnn"`` takes these queries on ``platform`` (default: the compile target)."""
    head_dim = q.shape[-1]
    return (
        (platform or current_target().platform) == "gpu"
        and q.dtype in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
    )


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    *,
    is_causal: bool,
    implementation: str | None = None,
) -> jax.Array:
    """Unmasked (or causal) GQA attention through ``jax.nn.dot_product_attention``.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` (kv heads are not repeated).
        scale: logit multiplier.
        is_causal: query i sees keys 0..i (positions ``arange``).
        implementation: ``"cudnn"`` / ``"xla"``; default cuDNN where `cudnn_supported`, else XLA.

    Returns:
        ``[b, t, n, h]`` in q's dtype.
    """
    if implementation is None:
        implementation = "cudnn" if cudnn_supported(q) else "xla"
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation=implementation)
