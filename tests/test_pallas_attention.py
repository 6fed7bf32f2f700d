"""Pallas attention kernels (interpret mode on CPU) against dense fp32 reference attention.

Out, LSE and dq/dk/dv; GQA ratios, packed segments, permuted (zigzag-like) positions with
offsets, lengths that are not tile multiples, a ring hop's split of the keys merged by LSE with a
backward from the global LSE, bf16 inputs with fp32 statistics, and the ``kernel="pallas"``
paths of `attention.attention` (blockwise, and ring on the emulated 8-device mesh). Sizes are
small: interpret mode runs each kernel program in Python-driven loops.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import model
from attention import Target, attention, choose_kernel, compile_target, current_target, instrument
from attention import driver as driver_module
from attention.api import AttentionError
from attention.blockwise import blockwise_attention
from attention.kernel_table import get_kernel
from attention.layout import from_layout, to_layout
from attention.local_kernels import KernelSpec, pad_halves
from attention.masks import make_mask
from attention.merge import merge_partials
from attention.pallas_flash import pallas_backward, pallas_forward
from attention.reference import reference_attention
from attention.strategies import context_parallel_shard
from model.config import ConfigError
from sharding import MeshConfig, axis_rules, make_mesh

N, H = 4, 16
SCALE = H**-0.5


def _inputs(seed, b, t, s, kv_heads, dtype=np.float32):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q, k, v = normal(b, t, N, H), normal(b, s, kv_heads, H), normal(b, s, kv_heads, H)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), normal(b, t, N, H), normal(b, t, N)


def _pallas(tile, causal=True, counter=None):
    """Blockwise attention on the (interpreted) Triton-layout Pallas kernels with ``tile`` tiles."""

    def fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        kw = dict(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
        return blockwise_attention(
            q, k, v, **kw, causal=causal, scale=SCALE, chunk_size=tile, kernel="triton", counter=counter
        )

    return fn


def _loss_and_grads(fn, q, k, v, d_out, d_lse):
    """(out, lse, (dq, dk, dv)) of ``sum(out·d_out) + sum(finite lse·d_lse)``."""

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        finite = jnp.where(jnp.isfinite(lse), lse * d_lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, lse, grads


def _compare(got, want, out_tol, grad_tol):
    got, want = jax.tree.map(lambda x: np.asarray(x, np.float32), (got, want))
    assert np.max(np.abs(got[0] - want[0])) <= out_tol
    np.testing.assert_array_equal(np.isneginf(got[1]), np.isneginf(want[1]))
    finite = np.isfinite(want[1])
    assert np.max(np.abs(got[1][finite] - want[1][finite])) <= out_tol
    for g, w in zip(got[2], want[2], strict=True):
        assert np.max(np.abs(g - w)) <= grad_tol


# (causal, kv heads → GQA ratio 4/kv, t, s, permuted positions, packed segments, kv position offset, tile)
CASES = [
    (True, 4, 32, 32, False, False, 0, 8),  # MHA, aligned, tiles divide
    (True, 2, 40, 40, True, True, 0, 16),  # GQA 2, permuted + packed, padding to tiles
    (False, 1, 24, 40, True, True, 0, 8),  # MQA, bidirectional, cross lengths
    (True, 2, 24, 40, False, False, 10, 16),  # keys offset: early queries see nothing (zeros, -inf)
]


@pytest.mark.parametrize(("causal", "kv_heads", "t", "s", "permuted", "packed", "kv_offset", "tile"), CASES)
def test_pallas_attention_matches_reference(causal, kv_heads, t, s, permuted, packed, kv_offset, tile):
    rng = np.random.default_rng(t + s)
    b = 2
    order = lambda n, off: np.stack([rng.permutation(n) if permuted else np.arange(n) for _ in range(b)]) + off  # noqa: E731
    q_pos, kv_pos = order(t, 0).astype(np.int32), order(s, kv_offset).astype(np.int32)
    seg = lambda p: (p >= 13).astype(np.int32) + (p >= 29) if packed else np.zeros_like(p)  # noqa: E731
    q_seg, kv_seg = seg(q_pos), seg(kv_pos)
    q, k, v, d_out, d_lse = _inputs(t, b, t, s, kv_heads)
    cfg = _pallas(tile, causal)
    mask = make_mask(q_pos, kv_pos, q_seg, kv_seg, causal)

    def both(q, k, v):
        got = _loss_and_grads(lambda *x: cfg(*x, q_pos, kv_pos, q_seg, kv_seg), q, k, v, d_out, d_lse)
        want = _loss_and_grads(lambda *x: reference_attention(*x, mask, SCALE), q, k, v, d_out, d_lse)
        return got, want

    got, want = jax.jit(both)(q, k, v)
    if kv_offset:
        assert np.all(np.isneginf(got[1][:, :kv_offset])) and np.all(np.asarray(got[0])[:, :kv_offset] == 0)
    _compare(got, want, out_tol=1e-5, grad_tol=1e-4)


def test_ring_hop_split_merges_and_backward_uses_global_lse():
    """Keys split in two zigzag-ordered blocks, as two ring hops see them: forward per hop + LSE
    merge equals attention over all keys; per-hop backward from the global out/LSE sums to it."""
    b, t, kv_heads = 1, 32, 2
    q, k, v, d_out, _ = _inputs(5, b, t, t, kv_heads)
    pos = to_layout(np.arange(t, dtype=np.int32)[None], 2, "zigzag")  # [0..7, 24..31 | 8..15, 16..23]
    seg = np.zeros_like(pos)
    kw = dict(causal=True, scale=SCALE, block_q=8, block_k=8)
    halves = [slice(0, 16), slice(16, 32)]
    out_lse = [pallas_forward(q, k[:, h], v[:, h], pos, pos[:, h], seg, seg[:, h], **kw) for h in halves]
    out, lse = merge_partials(*out_lse[0], *out_lse[1])
    want_out, want_lse = reference_attention(q, k, v, make_mask(pos, pos), SCALE)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5)

    delta = jnp.sum(d_out * out, axis=-1)
    parts = [
        pallas_backward(q, k[:, h], v[:, h], pos, pos[:, h], seg, seg[:, h], d_out, lse, delta, **kw) for h in halves
    ]
    dq = parts[0][0] + parts[1][0]
    dk, dv = (jnp.concatenate([parts[0][i], parts[1][i]], axis=1) for i in (1, 2))
    mask = make_mask(pos, pos)
    want = jax.grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, mask, SCALE)[0] * d_out), (0, 1, 2))(q, k, v)
    for got, ref in zip((dq, dk, dv), want, strict=True):
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_fully_hidden_block_gives_zeros_and_no_gradient():
    q, k, v, d_out, _ = _inputs(1, 1, 16, 16, 2)
    q_pos = np.arange(16, dtype=np.int32)[None]
    kw = dict(causal=True, scale=SCALE, block_q=8, block_k=8)
    out, lse = pallas_forward(q, k, v, q_pos, q_pos + 100, q_pos * 0, q_pos * 0, **kw)  # keys all in the future
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(lse))
    grads = pallas_backward(q, k, v, q_pos, q_pos + 100, q_pos * 0, q_pos * 0, d_out, lse, lse * 0, **kw)
    assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_bf16_inputs_keep_fp32_statistics():
    """bf16 q/k/v: logits, LSE and softmax sums stay fp32 (LSE within 1e-4 of fp32 attention on the
    same bf16-valued inputs; bf16 statistics would be ~1e-2 off); p and dS are rounded to bf16 for
    the matmuls and the output is bf16: |Δ| ≤ 2e-2 on outputs (≈ 2.5 bf16 ulps at |x|≈1), 5e-2 on grads."""
    b, t = 2, 48
    q, k, v, d_out, d_lse = _inputs(3, b, t, t, 2, jnp.bfloat16)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    zeros = np.zeros_like(pos)
    cfg = _pallas(16)
    mask = make_mask(pos, pos)
    got = jax.jit(lambda *x: _loss_and_grads(lambda *y: cfg(*y, pos, pos, zeros, zeros), *x))(q, k, v, d_out, d_lse)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in got[2])
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    want = _loss_and_grads(lambda *y: reference_attention(*y, mask, SCALE), *f32, d_out, d_lse)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=1e-5)
    _compare(got, want, out_tol=2e-2, grad_tol=5e-2)


def test_attention_blockwise_pallas_kernel_matches_jnp_and_reference():
    q, k, v, _, _ = _inputs(7, 2, 40, 40, 2)
    pos = np.stack([np.random.default_rng(i).permutation(40) for i in range(2)]).astype(np.int32)
    seg = (pos >= 20).astype(np.int32)
    kw = dict(impl="blockwise", q_positions=pos, kv_positions=pos, segment_ids=seg, chunk_size=16)
    pallas = jax.jit(lambda q, k, v: attention(q, k, v, kernel="pallas", **kw))(q, k, v)
    jnp_loops = jax.jit(lambda q, k, v: attention(q, k, v, kernel="jnp", **kw))(q, k, v)
    want = reference_attention(q, k, v, make_mask(pos, pos, seg, seg), SCALE)[0]
    np.testing.assert_allclose(pallas, want, atol=1e-5)
    np.testing.assert_allclose(pallas, jnp_loops, atol=1e-5)


def test_kernel_choice():
    assert choose_kernel("auto", "cpu") == "jnp"
    assert choose_kernel("auto", "gpu") == "triton"  # compute capability unknown: not assumed Hopper
    assert choose_kernel("auto", target=Target("gpu", 8.0), head_dim=128) == "triton"
    assert choose_kernel("auto", target=Target("gpu", 8.0), head_dim=96) == "jnp"  # Triton tiles are powers of two
    assert choose_kernel("auto", target=Target("gpu", 9.0), head_dim=128, dtype=jnp.bfloat16) == "mosaic_gpu"
    assert choose_kernel("auto", target=Target("gpu", 9.0), head_dim=128, dtype=jnp.float32) == "triton"
    assert choose_kernel("auto", target=Target("gpu", 9.0), head_dim=96, dtype=jnp.bfloat16) == "jnp"
    assert choose_kernel("auto", "tpu") == "mosaic_tpu"
    assert choose_kernel("pallas", "cpu") == "triton"  # interpreted
    assert choose_kernel("jnp", "gpu") == "jnp"
    with compile_target("tpu"):
        assert choose_kernel("auto") == "mosaic_tpu" and current_target().interpret is False
    assert current_target().platform == "cpu"
    with pytest.raises(AttentionError, match="unknown attention kernel 'cuda'"):
        choose_kernel("cuda")


def _ring_case(layout, ring=8, t=64, kv_heads=2, packed=True):
    q, k, v, d_out, d_lse = _inputs(11, 1, t, t, kv_heads)
    pos = np.arange(t, dtype=np.int32)[None]
    seg = ((pos >= 21).astype(np.int32) + (pos >= 50)) if packed else np.zeros_like(pos)
    lay = lambda x: to_layout(x, ring, layout)  # noqa: E731
    return [lay(x) for x in (q, k, v, d_out, d_lse, pos, seg)], (pos, seg)


def test_pallas_ring_shard_zigzag_on_eight_devices():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=8))
    (q, k, v, d_out, d_lse, pos, seg), (nat_pos, nat_seg) = _ring_case("zigzag")
    act, tok, stat = P(None, "sequence", None, None), P(None, "sequence"), P(None, "sequence", None)
    shard = functools.partial(context_parallel_shard, strategy="ring", scale=SCALE, chunk_size=8, kernel="triton")
    # check_vma=False: Pallas's interpret mode does not type its loops' manual axes (jax 0.10).
    ring = jax.shard_map(
        shard, mesh=mesh, in_specs=(act, act, act, tok, tok, tok, tok), out_specs=(act, stat), check_vma=False
    )
    got = jax.jit(lambda *x: _loss_and_grads(lambda *y: ring(*y, pos, pos, seg, seg), *x))(q, k, v, d_out, d_lse)
    mask = make_mask(pos, pos, seg, seg, True)
    want = _loss_and_grads(lambda *y: reference_attention(*y, mask, SCALE), q, k, v, d_out, d_lse)
    _compare(got, want, out_tol=1e-5, grad_tol=1e-4)
    # Layout round trip: the reference in natural order agrees after un-permuting.
    nat = reference_attention(
        *(from_layout(x, 8, "zigzag") for x in (q, k, v)), make_mask(nat_pos, nat_pos, nat_seg, nat_seg), SCALE
    )
    np.testing.assert_allclose(from_layout(got[0], 8, "zigzag"), nat[0], atol=1e-5)


def test_model_attention_kernel_switch_reaches_the_kernel():
    """``LlamaConfig.attention_kernel`` reaches `attention`: the tiny model's loss and gradients
    with Pallas blockwise attention under full remat equal the jnp loops' (a bad name is a config error)."""
    with pytest.raises(ConfigError, match="unknown attention_kernel 'cuda'"):
        model.preset("tiny", attention_kernel="cuda")
    cfg = model.preset("tiny", attention_impl="blockwise", attention_chunk=8, num_layers=1, remat_policy="full")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16))
    params = model.Llama(cfg).init(jax.random.key(0), tokens)["params"]

    def run(kernel):
        llama = model.Llama(cfg.replace(attention_kernel=kernel))
        loss = lambda p: jnp.sum(llama.apply({"params": p}, tokens) ** 2) * 1e-3  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_p, grads_p), (loss_j, grads_j) = run("pallas"), run("jnp")
    np.testing.assert_allclose(loss_p, loss_j, rtol=1e-5)
    for gp, gj in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_j), strict=True):
        np.testing.assert_allclose(gp, gj, atol=1e-5, rtol=1e-4)


def test_masked_tiles_are_skipped_not_computed():
    """Causal, 4 query × 4 key tiles of 8, 2 query heads on 1 kv head: only the 10 tile pairs on or
    below the diagonal run, per head (20) in the forward, dq and dk/dv kernels; two documents that
    split the sequence in halves leave 6 per head (the diagonal blocks of each document)."""
    q, k, v, d_out, _ = _inputs(2, 1, 32, 32, 1)
    q, k, v, d_out = q[:, :, :2], k, v, d_out[:, :, :2]
    pos = np.arange(32, dtype=np.int32)[None]

    def counts(seg):
        with instrument.count_work() as c:
            cfg = _pallas(8, counter=c)
            fn = jax.jit(lambda *x: jax.vjp(lambda *y: cfg(*y, pos, pos, seg, seg)[0], *x)[1](d_out))
            jax.block_until_ready(fn(q, k, v))
            jax.effects_barrier()
        return c[("tile_fwd", 0)], c[("tile_dq", 0)], c[("tile_dkv", 0)]

    assert counts(np.zeros_like(pos)) == (20, 20, 20)
    assert counts((pos >= 16).astype(np.int32)) == (12, 12, 12)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_attention_ring_pallas_kernel_on_eight_devices(layout):
    """`attention(impl="ring", kernel="pallas")` on the emulated mesh (data=2 × sequence=4 for
    zigzag, sequence=8 for striped): out and grads equal the dense reference; GQA 2, documents
    crossing shards, the layout's permuted positions."""
    mesh_cfg = (
        MeshConfig(data=2, fsdp=1, tensor=1, sequence=4) if layout == "zigzag" else MeshConfig(sequence=8, fsdp=1)
    )
    ring = mesh_cfg.sequence
    mesh = make_mesh(mesh_cfg)
    b, t = 2, 64
    q, k, v, d_out, _ = _inputs(13, b, t, t, 2)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    seg = (pos >= 21).astype(np.int32) + (pos >= 50)
    q, k, v, d_out, pos, seg = (to_layout(x, ring, layout) for x in (q, k, v, d_out, pos, seg))

    def loss(fn):
        return lambda *x: jnp.sum(fn(*x).astype(jnp.float32) * d_out)

    @axis_rules(mesh)
    def ring_fn(q, k, v):
        kw = dict(impl="ring", mesh=mesh, q_positions=pos, kv_positions=pos, segment_ids=seg, chunk_size=8)
        return attention(q, k, v, kernel="pallas", **kw)

    mask = make_mask(pos, pos, seg, seg, True)
    got = jax.jit(lambda *x: (ring_fn(*x), jax.grad(loss(ring_fn), (0, 1, 2))(*x)))(q, k, v)
    ref_fn = lambda q, k, v: reference_attention(q, k, v, mask, SCALE)[0]  # noqa: E731
    want = (ref_fn(q, k, v), jax.grad(loss(ref_fn), (0, 1, 2))(q, k, v))
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_blockwise_attention_kernel_argument():
    q, k, v, _, _ = _inputs(9, 1, 24, 24, 1)
    out_p, lse_p = blockwise_attention(q, k, v, chunk_size=8, kernel="pallas")
    out_j, lse_j = blockwise_attention(q, k, v, chunk_size=8, kernel="jnp")
    np.testing.assert_allclose(out_p, out_j, atol=1e-5)
    np.testing.assert_allclose(lse_p, lse_j, atol=1e-5)


def test_pallas_ring_tiles_stay_whole_at_1000_tokens_per_device(monkeypatch):
    """1,000 tokens per device (zigzag halves of 500): each half is padded to 512 and cut into 128-token
    tiles (before, the tile was the largest power of two dividing 500: 4), and the ring stays exact."""
    assert get_kernel("triton").tile(KernelSpec(True, SCALE, chunk=512), 500) == 128
    pads = []

    def spy(x, tile, value, edge=False):
        out = pad_halves(x, tile, value, edge)
        pads.append((x.shape[1], out.shape[1], tile))
        return out

    monkeypatch.setattr(driver_module, "pad_halves", spy)
    ring, t = 2, 2000
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=ring), devices=jax.devices()[:ring])
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, t, n, H), np.float32) for n in (2, 1, 1))
    pos = to_layout(np.arange(t, dtype=np.int32)[None], ring, "zigzag")
    q, k, v = (to_layout(x, ring, "zigzag") for x in (q, k, v))
    fn = lambda q, k, v: attention(q, k, v, impl="ring", mesh=mesh, q_positions=pos, kv_positions=pos,  # noqa: E731
                                   kernel="triton", chunk_size=512, scale=SCALE)  # fmt: skip
    d_out = rng.standard_normal(q.shape, np.float32)
    got_out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    got = vjp(d_out)
    mask = make_mask(pos, pos)
    want_out, want_vjp = jax.vjp(lambda *x: reference_attention(*x, mask, SCALE)[0], q, k, v)
    np.testing.assert_allclose(got_out, want_out, atol=1e-5)
    for g, w in zip(got, want_vjp(d_out), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)
    assert (1000, 1024, 128) in pads  # every local block: two halves of 500 → 512, tile 128
