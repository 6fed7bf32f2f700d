"""The ``xla`` attention path: no mask of our own, ``is_causal`` for cuDNN, and the fallbacks.

On CPU the lowered program is the evidence: with default positions `attention(impl="xla")`
must lower to exactly the program of ``jax.nn.dot_product_attention(..., is_causal=True)``
and contain no per-batch ``[b, t, s]`` mask, boolean or float (an additive bias) — the one the
old code built from positions and passed in. XLA's own CPU implementation of ``is_causal`` still
forms an iota ``[t, s]`` comparison inside its softmax; cuDNN's causal mask type replaces it on
GPU. The fallback (blockwise) program holds no ``[t, s]`` plane of any element type at all.
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


_TENSOR = re.compile(r"tensor<((?:\d+x)*)([a-z]\w*)>")


def _tensors(text: str) -> set[tuple[tuple[int, ...], str]]:
    """``(shape, element type)`` of every tensor in a lowered program."""
    return {(tuple(int(d) for d in dims.split("x") if d), elem) for dims, elem in _TENSOR.findall(text)}


def _planes(text: str) -> set[tuple[tuple[int, ...], str]]:
    """The tensors whose last two dims are a whole ``[t, s]`` plane, of any element type."""
    return {(shape, elem) for shape, elem in _tensors(text) if shape[-2:] == (T, T)}


def _masks(text: str) -> set[tuple[tuple[int, ...], str]]:
    """Per-batch ``[b, t, s]`` / ``[b, 1, t, s]`` planes of any element type: a mask or an additive bias."""
    return {(shape, elem) for shape, elem in _planes(text) if shape in ((B, T, T), (B, 1, T, T))}


@pytest.mark.parametrize("causal", [True, False])
def test_xla_default_positions_builds_no_mask(causal):
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, KV, H), jnp.float32)
    ours = jax.jit(lambda q, k, v: attention(q, k, v, causal=causal, impl="xla")).lower(q, kv, kv).as_text()
    plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)).lower(q, kv, kv)
    assert not _masks(ours), _masks(ours)
    # No mask, no position arrays, no zeroing of empty rows: the whole program is JAX's own.
    assert ours == plain.as_text()
    if not causal:
        assert not any(elem == "i1" for _, elem in _tensors(ours))


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

    planes = _planes(jax.jit(fn).lower(q, kv, kv, pos).as_text())
    assert not planes, planes


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.float32])
def test_the_checks_see_bool_and_float_masks(dtype):
    """A dense mask handed to JAX's attention, as a boolean ``mask`` or a float ``bias``, is what they reject."""
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, KV, H), jnp.float32)
    dense = jax.ShapeDtypeStruct((B, 1, T, T), dtype)
    key = "mask" if dtype == jnp.bool_ else "bias"
    text = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, **{key: m})).lower(q, kv, kv, dense)
    text = text.as_text()
    elem = "i1" if dtype == jnp.bool_ else "f32"
    assert ((B, 1, T, T), elem) in _masks(text) and ((B, 1, T, T), elem) in _planes(text)


def test_cudnn_supported_rules():
    bf16 = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
    assert cudnn_supported(bf16, "gpu")
    assert not cudnn_supported(bf16, "cpu")
    assert not cudnn_supported(bf16.astype(jnp.float32), "gpu")
    assert not cudnn_supported(jnp.zeros((1, 8, 4, 100), jnp.bfloat16), "gpu")
