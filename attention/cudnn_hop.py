"""cuDNN flash attention for one ring hop: the output *and* an fp32 log-sum-exp to merge hops with.

Shape letters: the legend in `attention` (b t s n k h here).

A ring hop is either the causal diagonal (query and key blocks at the same positions) or a block
that is fully visible: exactly cuDNN's ``is_causal`` / no-mask cases, so a contiguous ring can run
its hops on cuDNN (zigzag, striped or packed layouts need position masks: use the Pallas kernels).

Why not just ``jax.nn.dot_product_attention(..., return_residual=True)``: in jax 0.10.2 it returns
the residual cast to the *output's* dtype (``residual.astype(out.dtype)``, also on the ``xla``
path: ``.astype(key.dtype)``), so bf16 inputs give a bf16 LSE — about 3 significant digits, a
weight error of several percent once LSEs of ~10 are merged. cuDNN itself produces fp32 softmax
statistics ``[b, n, t]``; `cudnn_forward` takes them from JAX's cuDNN entry point
(``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``, the function the public one
calls) before that cast, and raises if a future JAX removes it rather than merging with bf16 LSEs.

The statistic is the natural-log LSE of the *scaled* logits (the public function hands cuDNN's
statistic back as the same residual its ``xla`` path computes as ``logsumexp(scale · q·k)``).
GQA is native: cuDNN takes k kv heads for n query heads (n % k == 0) without repeating K/V.

The backward of a ring built on this must be its own custom VJP (`attention.ring`): cuDNN's VJP
starts from its own hop's statistics, not the global LSE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention.kernels import AttentionError

IMPLEMENTATIONS = ("cudnn", "xla")


def _cudnn_entry():
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    except ImportError:  # pragma: no cover - depends on the JAX release
        cudnn_attention = None
    fn = getattr(cudnn_attention, "dot_product_attention", None)
    mask_type = getattr(cudnn_attention, "MaskType", None)
    if fn is None or mask_type is None:  # pragma: no cover
        raise AttentionError(
            f"jax {jax.__version__} has no cuDNN attention entry point with fp32 statistics "
            "(jax._src.cudnn.fused_attention_stablehlo.dot_product_attention); use kernel='pallas' for ring hops."
        )
    return fn, mask_type


def cudnn_forward(q, k, v, *, causal: bool, scale: float, implementation: str = "cudnn"):
    """One hop of attention with its log-sum-exp, on cuDNN's fused flash kernel.

    Args:
        q: ``[b, t, n, h]``; k, v: ``[b, s, k, h]`` with ``n % k == 0`` (bf16 or f16 for cuDNN).
        causal: the key block is the causal diagonal of the query block (same positions, t == s);
            False: every key is visible.
        scale: logit multiplier.
        implementation: ``cudnn`` (GPU), or ``xla`` — JAX's dense reference path of the same
            function, for checking the contract on CPU (its LSE is computed in the input dtype).

    Returns:
        out ``[b, t, n, h]`` in q's dtype and lse fp32 ``[b, t, n]`` (natural log, scaled logits).
    """
    if implementation not in IMPLEMENTATIONS:
        raise AttentionError(f"unknown cuDNN hop implementation {implementation!r}: use one of {IMPLEMENTATIONS}.")
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise AttentionError(f"cudnn hop: k {k.shape} / v {v.shape} do not fit q {q.shape} (n % kv_heads == 0).")
    if causal and k.shape[1] != t:
        raise AttentionError(f"cudnn hop: a causal hop is the diagonal block, so t == s (got {t} and {k.shape[1]}).")
    if implementation == "xla":
        out, lse = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, implementation="xla", return_residual=True
        )
        return out, lse.astype(jnp.float32)
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise AttentionError(f"cuDNN flash attention takes bf16 or f16, got {q.dtype}: cast, or use kernel='pallas'.")
    fn, mask_type = _cudnn_entry()
    out, stats_bnt = fn(
        q,
        k,
        v,
        scale=scale,
        mask_type=mask_type.CAUSAL if causal else mask_type.NO_MASK,
        qkv_layout="BTNH",
        return_residual=True,
    )
    return out, jnp.swapaxes(stats_bnt, 1, 2).astype(jnp.float32)  # [b, n, t] -> [b, t, n]
