"""Blockwise (flash) attention against dense fp32 reference attention: outputs, LSE and gradients.

Cases cover every value of each axis pairwise rather than the full product: causal /
bidirectional, GQA ratios 1/2/4/8, chunk sizes that divide the length, do not, or exceed it,
natural and permuted token orders, packed documents, cross lengths with fully masked rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import attention, instrument
from attention.blockwise import blockwise_attention
from attention.flash import kv_chunks, kv_unchunk, q_chunks, q_unchunk
from attention.masks import make_mask
from attention.reference import reference_attention

N_HEADS, HEAD_DIM = 8, 16


def _inputs(seed, b, t, s, kv_heads, dtype=np.float32):
    # numpy inputs: no eager jax ops, so each case compiles exactly one program.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q = normal(b, t, N_HEADS, HEAD_DIM).astype(dtype)
    k = normal(b, s, kv_heads, HEAD_DIM).astype(dtype)
    v = normal(b, s, kv_heads, HEAD_DIM).astype(dtype)
    return q, k, v, normal(b, t, N_HEADS, HEAD_DIM), normal(b, t, N_HEADS)


def _positions(rng, b, length, order, offset=0):
    rows = [np.arange(length) if order == "natural" else rng.permutation(length) for _ in range(b)]
    return np.stack(rows).astype(np.int32) + offset


def _segments(positions, packed):
    # Documents are position ranges (packing), so a permuted order scatters them over chunks.
    if not packed:
        return None
    return (positions >= 9).astype(np.int32) + (positions >= 23) + 2 * (positions >= 30)


def _run(fn, reference, q, k, v, d_out, d_lse):
    """(out, lse, grads) of ``sum(out·d_out) + sum(lse·d_lse)`` (finite lse only) for ``fn`` and
    for ``reference`` on fp32 copies of the inputs, in one jitted program; numpy results."""

    def results(fn, q, k, v):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            finite_lse = jnp.where(jnp.isfinite(lse), lse * d_lse, 0.0)
            return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    def both(q, k, v):
        return results(fn, q, k, v), results(reference, *(x.astype(jnp.float32) for x in (q, k, v)))

    got, want = jax.jit(both)(q, k, v)
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32 and all(g.dtype == q.dtype for g in got[2])
    return jax.tree.map(lambda x: np.asarray(x, np.float32), (got, want))


def _compare(blockwise, reference, out_tol, grad_tol):
    out_b, lse_b, g_b = blockwise
    out_r, lse_r, g_r = reference
    assert np.max(np.abs(out_b - out_r)) <= out_tol
    np.testing.assert_array_equal(np.isinf(lse_b), np.isinf(lse_r))
    finite = np.isfinite(lse_r)
    assert np.max(np.abs(lse_b[finite] - lse_r[finite])) <= out_tol
    for gb, gr in zip(g_b, g_r, strict=True):
        assert np.max(np.abs(gb - gr)) <= grad_tol


# (causal, kv_heads → GQA ratio 8/kv_heads, chunk, t, s, token order, packed documents, kv position offset)
CASES = [
    (True, 8, 16, 32, 32, "natural", False, 0),  # ratio 1, chunk divides
    (False, 4, 12, 40, 40, "permuted", True, 0),  # ratio 2, chunk does not divide
    (True, 2, 7, 40, 40, "permuted", True, 0),  # ratio 4, odd chunk
    (False, 1, 64, 40, 40, "natural", True, 0),  # ratio 8, chunk longer than the sequence
    (True, 1, 8, 32, 32, "permuted", False, 0),  # ratio 8, causal over a permuted order
    (True, 4, 5, 24, 40, "natural", True, 10),  # cross lengths: queries before every key see nothing
    (False, 2, 16, 24, 40, "permuted", False, 0),
]


@pytest.mark.parametrize(("causal", "kv_heads", "chunk", "t", "s", "order", "packed", "kv_offset"), CASES)
def test_blockwise_matches_reference(causal, kv_heads, chunk, t, s, order, packed, kv_offset):
    rng = np.random.default_rng(chunk)
    b = 2
    q_pos = _positions(rng, b, t, order)
    kv_pos = q_pos if (t == s and not kv_offset) else _positions(rng, b, s, order, kv_offset)
    q_seg, kv_seg = _segments(q_pos, packed), _segments(kv_pos, packed)
    q, k, v, d_out, d_lse = _inputs(chunk, b, t, s, kv_heads)

    def blockwise(q, k, v):
        return blockwise_attention(
            q,
            k,
            v,
            q_positions=q_pos,
            kv_positions=kv_pos,
            q_segment_ids=q_seg,
            kv_segment_ids=kv_seg,
            causal=causal,
            chunk_size=chunk,
        )

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(q_pos, kv_pos, q_seg, kv_seg, causal), HEAD_DIM**-0.5)

    got, want = _run(blockwise, reference, q, k, v, d_out, d_lse)
    if kv_offset:
        # The early queries see no key: zeros and lse -inf, like the reference.
        assert np.all(np.isneginf(got[1][:, :kv_offset])) and np.all(got[0][:, :kv_offset] == 0)
    _compare(got, want, out_tol=1e-5, grad_tol=1e-4)


def test_blockwise_bf16_within_documented_bound():
    """bf16 inputs: logits, softmax and accumulators stay fp32, but p and dS are rounded to bf16
    for the matmuls and the output is bf16, so against fp32 attention on the same (bf16-valued)
    inputs we allow |Δ| ≤ 2e-2 on outputs (≈ 2.5 bf16 ulps at |x|≈1) and ≤ 5e-2 on grads."""
    q, k, v, d_out, d_lse = _inputs(3, 2, 48, 48, 2, jnp.bfloat16)
    pos = np.broadcast_to(np.arange(48, dtype=np.int32), (2, 48))
    mask = make_mask(pos, pos, None, None, True)
    got, want = _run(
        lambda q, k, v: blockwise_attention(q, k, v, chunk_size=16),
        lambda q, k, v: reference_attention(q, k, v, mask, HEAD_DIM**-0.5),
        q, k, v, d_out, d_lse,
    )  # fmt: skip
    _compare(got, want, out_tol=2e-2, grad_tol=5e-2)


def test_causal_chunk_skipping_is_real():
    """Causal, 4 chunks of 8: only the 10 chunk pairs on or below the diagonal run, forward and backward,
    and only the 4 diagonal ones build a mask (the 6 below it take the mask-free path)."""
    q, k, v, d_out, _ = _inputs(0, 1, 32, 32, 2)

    def run(skip):
        with instrument.count_work() as counts:
            fn = jax.jit(
                jax.grad(
                    lambda q, k, v: jnp.sum(
                        blockwise_attention(q, k, v, chunk_size=8, skip_masked=skip, counter=counts)[0] * d_out
                    ),
                    argnums=(0, 1, 2),
                )
            )
            jax.block_until_ready(fn(q, k, v))
            jax.effects_barrier()
            return dict(counts)

    assert run(True) == {("chunk_fwd", 0): 10, ("chunk_bwd", 0): 10, ("chunk_fwd_masked", 0): 4}
    assert run(False) == {("chunk_fwd", 0): 16, ("chunk_bwd", 0): 16, ("chunk_fwd_masked", 0): 16}


def test_activation_memory_is_linear_in_length():
    """The backward keeps O(S·d) residuals: doubling S roughly doubles compiled temp memory (dense would ×4)."""

    def temp_bytes(s):
        q = jax.ShapeDtypeStruct((1, s, 4, 32), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, s, 2, 32), jnp.float32)
        fn = jax.jit(
            jax.grad(lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, chunk_size=128)[0]), argnums=(0, 1, 2))
        )
        return fn.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(2048)
    assert large / small < 2.6
    assert large < 2048 * 2048 * 4  # far below one fp32 [S, S] matrix for a single head


def test_api_dispatches_blockwise_and_rejects_half_segments():
    q, k, v, _, _ = _inputs(1, 1, 24, 24, 2)
    seg = np.repeat([[0, 1, 2]], 8, axis=1).reshape(1, 24)

    def both(q, k, v):
        got = attention(q, k, v, segment_ids=seg, impl="blockwise", chunk_size=5)
        return got, attention(q, k, v, segment_ids=seg, impl="reference")

    got, want = jax.jit(both)(q, k, v)
    assert np.max(np.abs(np.asarray(got) - np.asarray(want))) <= 1e-5
    with pytest.raises(ValueError, match="both"):
        blockwise_attention(q, k, v, q_segment_ids=seg)


def test_chunk_major_layout_is_exact_and_groups_query_heads_by_kv_head():
    x = np.arange(2 * 12 * 8 * 3, dtype=np.float32).reshape(2, 12, 8, 3)  # [b, t, n=8, h]
    qc = np.asarray(q_chunks(x, 2, 4))  # 2 kv heads (g = 4), chunks of 4 tokens
    assert qc.shape == (3, 2, 2, 16, 3)
    # Row g·c + i of kv head kh in chunk j is token j·4 + i, query head kh·4 + g.
    np.testing.assert_array_equal(qc[1, 0, 1, 2 * 4 + 3], x[0, 1 * 4 + 3, 1 * 4 + 2])
    np.testing.assert_array_equal(np.asarray(q_unchunk(qc, 4)), x)
    kv = x[:, :, :2]
    np.testing.assert_array_equal(np.asarray(kv_chunks(kv, 4))[2, 1, 0, 1], kv[1, 2 * 4 + 1, 0])
    np.testing.assert_array_equal(np.asarray(kv_unchunk(kv_chunks(kv, 4))), kv)
