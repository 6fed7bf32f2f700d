"""Mosaic TPU attention kernels (`attention.pallas_tpu`): numerics in interpret mode, real TPU compiles.

Numerics: out, LSE and dq/dk/dv against dense fp32 reference attention (gradients by ``jax.vjp``
with an LSE cotangent folded into delta), for causal and bidirectional masks, packed documents,
zigzag positions, ring-hop-like blocks (one of them hidden entirely), GQA 4:1 and 3:1, lengths that
are not tile multiples and h = 64 / 128, plus the tile pairs the kernels really computed.
Compiles: forward and backward lowered for v5p and v6e with libtpu's Mosaic compiler on this CPU
host (`tpu_fixtures`), for both head sizes, dtypes and GQA ratios. Shapes are tiny throughout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding
from tpu_fixtures import tpu_device  # noqa: F401  (session fixture)

from attention import instrument
from attention.kernels import compile_target
from attention.layout import layout_positions
from attention.masks import make_mask
from attention.pallas_tpu import mosaic_tpu_backward, mosaic_tpu_forward
from attention.reference import reference_attention

TOL = 1e-5  # fp32 everywhere (conftest sets matmuls to full precision)


def _arrays(seed, b, t, s, n, kh, h, dtype=np.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    q, k, v = normal(b, t, n, h), normal(b, s, kh, h), normal(b, s, kh, h)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(b, t, n, h), normal(b, t, n)


def _check_against_reference(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, d_lse, *, causal, bq, bk, counter=None):
    """Kernel forward and backward vs the reference; returns the kernel's lse."""
    scale = q.shape[-1] ** -0.5
    mask = make_mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal)
    (ref_out, ref_lse), vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask, scale), q, k, v)
    d_lse = jnp.where(jnp.isfinite(ref_lse), d_lse, 0.0)  # no cotangent on rows that see no key
    ref_grads = vjp((do, d_lse))

    kw = dict(causal=causal, scale=scale, block_q=bq, block_k=bk, interpret=True, counter=counter)
    out, lse = mosaic_tpu_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw)
    delta = jnp.sum(do * out, axis=-1) - d_lse  # the LSE cotangent folds into delta
    grads = mosaic_tpu_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta, **kw)

    assert out.dtype == lse.dtype == jnp.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    np.testing.assert_allclose(out, ref_out, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=TOL, rtol=0)
    for got, want, x in zip(grads, ref_grads, (q, k, v), strict=True):
        assert got.dtype == jnp.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    return out, lse, grads


def _positions(b, length, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + length, dtype=jnp.int32), (b, length))


def _visible_pairs(q_pos, kv_pos, q_seg, kv_seg, causal, bq, bk):
    """Tile pairs (over the batch) holding at least one visible (query, key) pair."""
    mask = np.asarray(make_mask(q_pos, kv_pos, q_seg, kv_seg, causal=causal))
    mask = np.pad(mask, ((0, 0), (0, -mask.shape[1] % bq), (0, -mask.shape[2] % bk)))
    b, tp, sp = mask.shape
    return int(mask.reshape(b, tp // bq, bq, sp // bk, bk).any(axis=(2, 4)).sum())


def _run_counted(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, d_lse, *, causal, bq, bk):
    """`_check_against_reference`, then: each kernel computed exactly the visible tile pairs."""
    with instrument.count_work() as counts:
        result = _check_against_reference(
            q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, d_lse, causal=causal, bq=bq, bk=bk, counter=counts
        )
        jax.effects_barrier()
    pairs = _visible_pairs(q_pos, kv_pos, q_seg, kv_seg, causal, bq, bk) * q.shape[2]  # per query head
    assert pairs > 0 and dict(counts) == {(kind, 0): pairs for kind in ("tile_fwd", "tile_dq", "tile_dkv")}
    return result, pairs


def test_causal_contiguous_packed_zigzag():
    """One batch row each: contiguous positions, packed documents, zigzag-permuted positions.

    GQA 4:1, h = 64, length 40 (not a multiple of the 16 tile).
    """
    b, t, n, kh, h, tile = 3, 40, 4, 1, 64, 16
    q, k, v, do, d_lse = _arrays(0, b, t, t, n, kh, h)
    pos = jnp.concatenate([_positions(2, t), layout_positions(1, t, 2, "zigzag")])
    seg = jnp.asarray([[0] * t, [0] * 9 + [1] * 19 + [2] * 12, [0] * t], jnp.int32)
    _, pairs = _run_counted(q, k, v, pos, pos, seg, seg, do, d_lse, causal=True, bq=tile, bk=tile)
    # Row 0 computes the causal triangle (6 of 9 tile pairs); row 1's documents hide more of it.
    assert _visible_pairs(pos[:1], pos[:1], seg[:1], seg[:1], True, tile, tile) == 6
    assert _visible_pairs(pos[1:2], pos[1:2], seg[1:2], seg[1:2], True, tile, tile) < 6


def test_bidirectional_gqa3():
    """Not causal, GQA 3:1, h = 128, t != s; the second row has two documents."""
    b, t, s, n, kh, h = 2, 24, 40, 6, 2, 128
    q, k, v, do, d_lse = _arrays(1, b, t, s, n, kh, h)
    q_seg = jnp.asarray([[0] * t, [0] * 10 + [1] * 14], jnp.int32)
    kv_seg = jnp.asarray([[0] * s, [0] * 17 + [1] * 23], jnp.int32)
    _run_counted(q, k, v, _positions(b, t, 100), _positions(b, s), q_seg, kv_seg, do, d_lse, causal=False, bq=8, bk=16)


def test_ring_hops():
    """A zigzag shard's queries against other shards' key blocks, one batch row per hop:
    keys all in the past, keys straddling the queries, keys all in the future (hidden entirely).
    """
    b, n, kh, h, length = 3, 6, 2, 128, 24
    q_pos = jnp.broadcast_to(layout_positions(1, 4 * length, 2, "zigzag")[:, 2 * length :], (b, 2 * length))
    kv_pos = jnp.concatenate([_positions(1, length, start) for start in (0, 36, 4 * length)])
    q, k, v, do, d_lse = _arrays(3, b, 2 * length, length, n, kh, h)
    q_seg, kv_seg = jnp.zeros((b, 2 * length), jnp.int32), jnp.zeros((b, length), jnp.int32)
    (out, lse, grads), _ = _run_counted(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, d_lse, causal=True, bq=16, bk=8)
    assert _visible_pairs(q_pos[2:], kv_pos[2:], q_seg[2:], kv_seg[2:], True, 16, 8) == 0
    dq, dk, dv = (np.asarray(g) for g in grads)
    assert not np.any(out[2]) and np.all(np.isneginf(lse[2])) and not (np.any(dq[2]) or np.any(dk[2]) or np.any(dv[2]))


def test_bf16_inputs_fp32_statistics():
    b, t, n, kh, h = 1, 32, 4, 2, 128
    q, k, v, do, _ = _arrays(4, b, t, t, n, kh, h, dtype=jnp.bfloat16)
    pos, seg = _positions(b, t), jnp.zeros((b, t), jnp.int32)
    mask = make_mask(pos, pos, seg, seg, causal=True)
    ref_out, ref_lse = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, h**-0.5)
    out, lse = mosaic_tpu_forward(q, k, v, pos, pos, seg, seg, causal=True, scale=h**-0.5, block_q=16, block_k=16)
    assert out.dtype == lse.dtype == jnp.float32
    # Logits are exact products of bf16 values accumulated in fp32; only p is rounded to bf16.
    np.testing.assert_allclose(lse, ref_lse, atol=TOL * 10, rtol=0)
    np.testing.assert_allclose(out, ref_out, atol=2e-2, rtol=0)


def test_bad_tile_is_refused():
    q, k, v, *_ = _arrays(0, 1, 16, 16, 2, 1, 64)
    pos = seg = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="multiple of 8"):
        mosaic_tpu_forward(q, k, v, pos, pos, seg, seg, causal=True, scale=1.0, block_q=12)
    with pytest.raises(ValueError, match="of 128 above 128"):
        mosaic_tpu_forward(q, k, v, pos, pos, seg, seg, causal=True, scale=1.0, block_k=192)


# ---------------------------------------------------------------------------------------------
# Real TPU compiles (deviceless: libtpu compiles for TPU chips this host does not have).


@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n, kh", [(4, 1), (3, 1)], ids=["gqa4", "gqa3"])
def test_compiles_for_tpu(tpu_device, h, dtype, n, kh):  # noqa: F811
    b, t = 1, 200  # not a multiple of the 128 tile: padded inside
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt, sharding=SingleDeviceSharding(tpu_device))  # noqa: E731
    ints = [spec((b, t), jnp.int32)] * 4
    stats = [spec((b, t, n), jnp.float32)] * 2

    def fwd_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta):
        kw = dict(causal=True, scale=h**-0.5, block_q=128, block_k=128)
        out = mosaic_tpu_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw)
        return out, mosaic_tpu_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, do, lse, delta, **kw)

    args = [spec((b, t, n, h)), spec((b, t, kh, h)), spec((b, t, kh, h)), *ints, spec((b, t, n, h)), *stats]
    with compile_target("tpu"):  # interpret=None follows the target: Mosaic, not the interpreter
        compiled = jax.jit(fwd_bwd).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    assert compiled.as_text().count("tpu_custom_call") == 3  # forward, dQ and dK/dV Mosaic kernels
