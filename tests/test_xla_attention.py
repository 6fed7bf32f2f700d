"""The ``xla`` attention path: no mask of our own, ``is_causal`` for cuDNN, and the fallbacks.

On CPU the lowered program is the evidence: with default positions `attention(impl="xla")`
must lower to exactly the program of ``jax.nn.dot_product_attention(..., is_causal=True)``
and contain no per-batch ``[b, t, s]`` boolean mask (the one the old code built from positions
and passed in). XLA's own CPU implementation of ``is_causal`` still forms an iota ``[t, s]``
comparison inside its softmax; cuDNN's causal mask type replaces it on GPU.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import attention
from attention.masks import make_mask
from attention.reference import reference_attention
from attention.xla import cudnn_supported

B, T, N, KV, H = 3, 128, 4, 2, 16  # distinct sizes, so a shape in the program names its axes


def _bool_shapes(text: str) -> set[str]:
    return set(re.findall(r"tensor<([0-9x]*)xi1>", text))


@pytest.mark.parametrize("causal", [True, False])
def test_xla_default_positions_builds_no_mask(causal):
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, KV, H), jnp.float32)
    ours = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, impl="xla")).lower(q, kv, kv).as_text()
    plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)).lower(q, kv, kv)
    bools = _bool_shapes(ours)
    assert f"{B}x{T}x{T}" not in bools and f"{B}x1x{T}x{T}" not in bools, bools
    # No mask, no position arrays, no zeroing of empty rows: the whole program is JAX's own.
    assert ours == plain.as_text()
    if not causal:
        assert not bools


def test_xla_matches_reference_and_falls_back_for_positions_and_segments():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 64, N, H), np.float32)
    k = rng.standard_normal((2, 64, KV, H), np.float32)
    v = rng.standard_normal((2, 64, KV, H), np.float32)
    pos = np.stack([rng.permutation(64) for _ in range(2)]).astype(np.int32) + 100
    seg = (pos >= 130).astype(np.int32)

    def both(q, k, v):
        plain = attention(q, k, v, impl="xla")
        # Explicit positions and segments: the fused local kernel (blockwise), not a dense mask.
        fallback = attention(q, k, v, impl="xla", q_positions=pos, kv_positions=pos, segment_ids=seg, chunk_size=16)
        return plain, fallback

    plain, fallback = jax.jit(both)(q, k, v)
    arange = jnp.broadcast_to(jnp.arange(64), (2, 64))
    want_plain = reference_attention(q, k, v, make_mask(arange, arange), H**-0.5)[0]
    want_fallback = reference_attention(q, k, v, make_mask(pos, pos, seg, seg), H**-0.5)[0]
    np.testing.assert_allclose(plain, want_plain, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(fallback, want_fallback, atol=2e-5, rtol=2e-5)


def test_xla_fallback_program_has_no_dense_mask():
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, KV, H), jnp.float32)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def fn(q, k, v, pos):
        return attention(q, k, v, impl="xla", q_positions=pos, kv_positions=pos, chunk_size=32, kernel="jnp")

    bools = _bool_shapes(jax.jit(fn).lower(q, kv, kv, pos).as_text())
    assert not any(shape.endswith(f"x{T}x{T}") for shape in bools), bools


def test_cudnn_supported_rules():
    bf16 = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
    assert cudnn_supported(bf16, "gpu")
    assert not cudnn_supported(bf16, "cpu")
    assert not cudnn_supported(bf16.astype(jnp.float32), "gpu")
    assert not cudnn_supported(jnp.zeros((1, 8, 4, 100), jnp.bfloat16), "gpu")
