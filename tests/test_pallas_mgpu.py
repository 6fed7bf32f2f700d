"""Mosaic GPU kernels in Pallas's GPU interpret mode, and the cuDNN hop's contract, against dense fp32 attention.

The GPU interpreter (jax 0.10) runs the kernels' grid, TMA copies into the two SMEM slots,
barriers, masks, tile skips, online softmax and stores; it cannot run WGMMA on a register or
transposed operand, so there the kernels multiply the same SMEM tiles with plain fp32-accumulating
dots (see `attention.pallas_mgpu`). What the tensor cores and register layouts do is checked only
by lowering (`tests/test_gpu_lowering.py`) and on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.cudnn_hop import cudnn_forward
from attention.masks import default_positions, make_mask
from attention.pallas_mgpu import mosaic_gpu_backward, mosaic_gpu_forward
from attention.reference import reference_attention

H = 64


def _case(seed, t, s, n, kv_heads, kv_offset, packed):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(1, t, n, H).astype(jnp.bfloat16)
    k, v = (normal(1, s, kv_heads, H).astype(jnp.bfloat16) for _ in range(2))
    q_pos = jnp.asarray(rng.permutation(t)[None] + kv_offset, jnp.int32)  # zigzag-like order
    kv_pos = jnp.asarray(rng.permutation(s)[None], jnp.int32)
    seg = lambda p: (p >= 70).astype(jnp.int32) if packed else jnp.zeros_like(p)  # noqa: E731
    return q, k, v, q_pos, kv_pos, seg(q_pos), seg(kv_pos), normal(1, t, n, H), normal(1, t, n)


# (causal, t, s, n, kv heads, query position offset, packed): GQA 4:1 and 3:1, lengths not tile multiples.
CASES = [(True, 100, 130, 4, 1, 20, True), (False, 70, 90, 3, 1, -40, False)]


@pytest.mark.slow  # ~20 s each: the GPU interpreter simulates every TMA copy and barrier through callbacks
@pytest.mark.parametrize(("causal", "t", "s", "n", "kv_heads", "offset", "packed"), CASES)
def test_mosaic_gpu_interpret_matches_reference(causal, t, s, n, kv_heads, offset, packed):
    """bf16 inputs, fp32 statistics: LSE within 1e-4, outputs 2e-2, grads 5e-2 (p and dS rounded to
    bf16 for the matmuls), the tolerances of the Triton kernel's bf16 test."""
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, d_lse = _case(t + s, t, s, n, kv_heads, offset, packed)
    mask = make_mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal)
    if not causal:  # queries with no key in their segment: zeros and -inf LSE
        mask = mask & (q_pos[:, :, None] >= 0)
        q_pos = jnp.where(q_pos >= 0, q_pos, -(2**31))  # Q_PAD: the kernels' "sees nothing" position

    def loss(q, k, v):
        out, lse = reference_attention(q, k, v, mask, H**-0.5)
        return jnp.sum(out * d_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * d_lse, 0.0)), (out, lse)

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(f32(q), f32(k), f32(v))
    assert bool(jnp.any(jnp.isneginf(lse))) == (not causal)

    got_out, got_lse = mosaic_gpu_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal, scale=H**-0.5)
    np.testing.assert_array_equal(np.isneginf(got_lse), np.isneginf(lse))
    finite = np.isfinite(lse)
    assert np.max(np.abs(np.asarray(got_lse)[finite] - np.asarray(lse)[finite])) <= 1e-4
    assert np.max(np.abs(got_out - out)) <= 2e-2

    delta = jnp.sum(d_out * out, -1) - jnp.where(finite, d_lse, 0.0)
    got = mosaic_gpu_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, d_out, lse, delta, causal=causal, scale=H**-0.5)
    for g, want in zip(got, grads, strict=True):
        assert g.dtype == jnp.float32 and g.shape == want.shape
        assert np.max(np.abs(g - want)) <= 5e-2


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_hop_contract_on_xla(causal):
    """`cudnn_forward`'s contract (out, fp32 natural-log LSE of the scaled logits, [b, t, n], GQA
    native) through JAX's xla implementation of the same function, at fp32."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 24, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 24, 2, 16)), jnp.float32) for _ in range(2))
    out, lse = cudnn_forward(q, k, v, causal=causal, scale=0.25, implementation="xla")
    pos = default_positions(2, 24)
    want_out, want_lse = reference_attention(q, k, v, make_mask(pos, pos, causal=causal), 0.25)
    assert lse.dtype == jnp.float32 and lse.shape == (2, 24, 4)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)
