"""Ring attention (shard_map over the ``sequence`` axis) against dense fp32 reference attention.

Each case lays tokens, positions and segment ids out for the ring (`attention.layout`), runs
`sharded_attention` with the global arrays, brings the output back to natural order and
compares outputs, LSE and dq/dk/dv with the reference. Axes are covered pairwise: ring sizes
1/2/4/8, layouts, causal/bidirectional, GQA ratios 1/2/4/8, packed documents crossing shard
boundaries, batch on data/fsdp and heads on tensor at the same time; and per-device blocks that
are not a multiple of the chunk, so padded K/V blocks travel the ring.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import attention, instrument
from attention import driver as driver_module
from attention.layout import from_layout, to_layout
from attention.local_kernels import pad_halves
from attention.masks import make_mask
from attention.reference import reference_attention
from attention.strategies import RingError, sharded_attention
from sharding import MeshConfig, axis_rules, flax_rules, make_mesh

N_HEADS, HEAD_DIM, LENGTH = 8, 16, 32


@pytest.fixture(autouse=True)
def _rules():
    # The shard_map specs come from the installed rules; the unfiltered table fits every mesh here.
    with axis_rules():
        yield


def _inputs(seed, b, kv_heads, dtype=np.float32, length=LENGTH):
    # numpy inputs: no eager jax ops, so each case compiles exactly one program.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q = normal(b, length, N_HEADS, HEAD_DIM).astype(dtype)
    k = normal(b, length, kv_heads, HEAD_DIM).astype(dtype)
    v = normal(b, length, kv_heads, HEAD_DIM).astype(dtype)
    return q, k, v, normal(b, length, N_HEADS, HEAD_DIM), normal(b, length, N_HEADS)


def _documents(b, length=LENGTH):
    # Document boundaries at positions that are not shard boundaries for any ring size (5, 13, 27 / 3, 19),
    # so documents span shards in every layout.
    pos = np.arange(length)
    rows = [np.searchsorted([5, 13, 27], pos, side="right"), np.searchsorted([3, 19], pos, side="right")]
    return np.stack([rows[i % 2] for i in range(b)]).astype(np.int32)


def _run(fn, reference, q, k, v, d_out, d_lse):
    """(out, lse, grads) of ``sum(out·d_out) + sum(lse·d_lse)`` for ``fn`` and for ``reference``
    (on fp32 copies of the inputs), in one jitted program; returned as numpy fp32."""

    def results(fn, q, k, v):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * d_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    def both(q, k, v):
        return results(fn, q, k, v), results(reference, *(x.astype(jnp.float32) for x in (q, k, v)))

    got, want = jax.jit(both)(q, k, v)
    assert got[0].dtype == q.dtype and all(g.dtype == q.dtype for g in got[2])
    return jax.tree.map(lambda x: np.asarray(x, np.float32), (got, want))


def _ring_vs_reference(
    mesh_cfg, layout, causal, kv_heads, packed, dtype=jnp.float32, skip=True, seed=0, length=LENGTH, chunk=4
):
    mesh = make_mesh(mesh_cfg)
    ring = mesh_cfg.sequence
    b = 2 * mesh_cfg.data * mesh_cfg.fsdp
    q, k, v, d_out, d_lse = _inputs(seed, b, kv_heads, dtype, length)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    seg = _documents(b, length) if packed else None

    def ring_fn(q, k, v):
        lay = lambda x: None if x is None else to_layout(x, ring, layout)  # noqa: E731
        out, lse = sharded_attention(
            lay(q),
            lay(k),
            lay(v),
            mesh=mesh,
            causal=causal,
            q_positions=lay(pos),
            kv_positions=lay(pos),
            q_segment_ids=lay(seg),
            kv_segment_ids=lay(seg),
            chunk_size=chunk,
            skip_masked=skip,
            return_lse=True,
        )
        return from_layout(out, ring, layout), from_layout(lse, ring, layout)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, seg, seg, causal), HEAD_DIM**-0.5)

    return _run(ring_fn, reference, q, k, v, d_out, d_lse)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


# (mesh, layout, causal, kv heads → GQA ratio 8/kv, packed documents)
CASES = [
    (MeshConfig(data=2, fsdp=1, tensor=4, sequence=1), "contiguous", True, 4, True),
    (MeshConfig(data=1, fsdp=2, tensor=2, sequence=2), "zigzag", False, 8, False),
    (MeshConfig(data=2, fsdp=2, tensor=1, sequence=2), "striped", True, 1, True),
    (MeshConfig(data=2, fsdp=1, tensor=1, sequence=4), "contiguous", False, 2, True),
    (MeshConfig(data=1, fsdp=2, tensor=1, sequence=4), "zigzag", True, 1, True),
    (MeshConfig(data=1, fsdp=1, tensor=2, sequence=4), "striped", False, 4, False),
    (MeshConfig(data=1, fsdp=1, tensor=1, sequence=8), "contiguous", True, 2, False),
    (MeshConfig(data=1, fsdp=1, tensor=1, sequence=8), "zigzag", True, 4, True),
    (MeshConfig(data=1, fsdp=1, tensor=1, sequence=8), "striped", False, 8, True),
]


@pytest.mark.parametrize(("mesh_cfg", "layout", "causal", "kv_heads", "packed"), CASES, ids=str)
def test_ring_matches_reference(mesh_cfg, layout, causal, kv_heads, packed):
    (out, lse, grads), (out_r, lse_r, grads_r) = _ring_vs_reference(mesh_cfg, layout, causal, kv_heads, packed)
    assert out.shape == out_r.shape == (2 * mesh_cfg.data * mesh_cfg.fsdp, LENGTH, N_HEADS, HEAD_DIM)
    assert _max_diff(out, out_r) <= 1e-5
    assert _max_diff(lse, lse_r) <= 1e-5
    for g, g_r in zip(grads, grads_r, strict=True):
        assert _max_diff(g, g_r) <= 1e-4


# (layout, causal, kv heads, length, chunk): per-device blocks of 5 (chunk 4: two chunks of 3) and 10 (zigzag
# halves of 5, each padded to 6), so every shard pads its K/V block with masked keys and the padded block
# travels round the 8-device ring.
PADDED = [
    ("contiguous", True, 2, 40, 4),
    ("striped", False, 8, 40, 4),
    ("zigzag", True, 4, 80, 4),
]


@pytest.mark.parametrize(("layout", "causal", "kv_heads", "length", "chunk"), PADDED, ids=str)
def test_ring_with_padded_blocks_matches_reference(layout, causal, kv_heads, length, chunk, monkeypatch):
    pads = []

    def spy(x, tile, value, edge=False):
        out = pad_halves(x, tile, value, edge)
        pads.append(out.shape[1] - x.shape[1])
        return out

    monkeypatch.setattr(driver_module, "pad_halves", spy)
    cfg = MeshConfig(data=1, fsdp=1, tensor=1, sequence=8)
    (out, lse, grads), (out_r, lse_r, grads_r) = _ring_vs_reference(
        cfg, layout, causal, kv_heads, True, length=length, chunk=chunk
    )
    assert pads and all(p > 0 for p in pads)  # the K/V blocks were padded
    assert _max_diff(out, out_r) <= 1e-5 and _max_diff(lse, lse_r) <= 1e-5
    for g, g_r in zip(grads, grads_r, strict=True):
        assert _max_diff(g, g_r) <= 1e-4


def test_classic_ring_without_hop_skipping_is_also_exact():
    cfg = MeshConfig(data=1, fsdp=1, tensor=1, sequence=8)
    (out, lse, grads), (out_r, lse_r, grads_r) = _ring_vs_reference(cfg, "contiguous", True, 2, True, skip=False)
    assert _max_diff(out, out_r) <= 1e-5 and _max_diff(lse, lse_r) <= 1e-5
    assert max(_max_diff(g, g_r) for g, g_r in zip(grads, grads_r, strict=True)) <= 1e-4


def test_ring_bf16_within_documented_bound():
    """bf16 q/k/v on 8 shards (zigzag, causal, packed): statistics and merges are fp32, but each
    hop's p/dS are rounded to bf16 for the matmuls and outputs/grads are bf16, so against fp32
    attention on the same bf16-valued inputs we allow |Δ| ≤ 2e-2 (outputs) and ≤ 5e-2 (grads)."""
    cfg = MeshConfig(data=1, fsdp=1, tensor=1, sequence=8)
    (out, lse, grads), (out_r, lse_r, grads_r) = _ring_vs_reference(cfg, "zigzag", True, 2, True, dtype=jnp.bfloat16)
    assert _max_diff(out, out_r) <= 2e-2 and _max_diff(lse, lse_r) <= 2e-2
    assert max(_max_diff(g, g_r) for g, g_r in zip(grads, grads_r, strict=True)) <= 5e-2


def _work_counts(layout, skip, ring=4, length=32):
    """Executed hops and chunk pairs per ring position for causal fwd+bwd (chunk = half a shard)."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=ring), devices=jax.devices()[:ring])
    q, k, v, d_out, _ = _inputs(1, 1, 2)
    pos = to_layout(np.arange(length, dtype=np.int32)[None], ring, layout)

    def loss(q, k, v):
        out = sharded_attention(
            q,
            k,
            v,
            mesh=mesh,
            q_positions=pos,
            kv_positions=pos,
            chunk_size=length // ring // 2,
            skip_masked=skip,
            counter=counts,
        )
        return jnp.sum(out * d_out)

    with instrument.count_work() as counts:
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
        jax.effects_barrier()
        counts = dict(counts)
    per = {kind: [counts.get((kind, r), 0) for r in range(ring)] for kind in ("hop_fwd", "chunk_fwd", "chunk_bwd")}
    assert per["chunk_fwd"] == per["chunk_bwd"]  # the backward skips exactly what the forward skipped
    return per


def test_hop_skipping_is_real_and_zigzag_balances_work():
    classic = _work_counts("contiguous", skip=False)
    assert classic["hop_fwd"] == [4, 4, 4, 4] and classic["chunk_fwd"] == [16, 16, 16, 16]
    contiguous = _work_counts("contiguous", skip=True)
    # Shard r sees r+1 non-future blocks: 3 chunk pairs on its own (diagonal) block, 4 on each earlier one.
    assert contiguous["hop_fwd"] == [1, 2, 3, 4] and contiguous["chunk_fwd"] == [3, 7, 11, 15]
    zigzag = _work_counts("zigzag", skip=True)
    # Every shard: 2 chunk pairs per other shard's block + 3 on its own = 2N + 1, perfectly balanced.
    assert zigzag["chunk_fwd"] == [9, 9, 9, 9]
    assert sum(zigzag["chunk_fwd"]) <= 0.6 * sum(classic["chunk_fwd"])
    striped = _work_counts("striped", skip=True)
    assert len(set(striped["chunk_fwd"])) == 1 and sum(striped["chunk_fwd"]) < sum(classic["chunk_fwd"])


def test_bad_lengths_and_meshes_fail_before_compiling():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=8))
    q = np.zeros((1, 36, 8, 16), np.float32)
    kv = np.zeros((1, 36, 2, 16), np.float32)
    with pytest.raises(RingError, match="divisible by 8"):
        sharded_attention(q, kv, kv, mesh=mesh)
    with pytest.raises(RingError, match="'sequence'"):
        sharded_attention(q, kv, kv, mesh=make_mesh(MeshConfig(data=1, fsdp=8)), axis_name="ring")
    with pytest.raises(RingError, match="batch 3"):
        sharded_attention(
            np.zeros((3, 32, 8, 16), np.float32),
            *[np.zeros((3, 32, 2, 16), np.float32)] * 2,
            mesh=make_mesh(MeshConfig(data=2, fsdp=1, sequence=4)),
        )


def test_attention_entry_point_runs_ring_and_falls_back_clearly():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=1, sequence=4))
    q, k, v, _, _ = _inputs(2, 2, 2)
    short = [x[:, :30] for x in (q, k, v)]

    def run(q, k, v, short):
        ring = attention(q, k, v, impl="auto", mesh=mesh, chunk_size=4)
        dense = attention(q, k, v, impl="reference")
        # A length the ring cannot shard: impl="auto" warns and runs blockwise.
        fallback = attention(*short, impl="auto", mesh=mesh, chunk_size=8)
        return ring, dense, fallback, attention(*short, impl="reference")

    with pytest.warns(UserWarning, match="falling back from ring to blockwise.*not divisible by the 4"):
        ring, dense, fallback, fallback_ref = jax.jit(run)(q, k, v, short)
    assert _max_diff(ring, dense) <= 1e-5
    assert _max_diff(fallback, fallback_ref) <= 1e-5
    with pytest.raises(ValueError, match="not divisible by the 4"):
        attention(*short, impl="ring", mesh=mesh)


def test_ring_specs_come_from_the_installed_rules():
    """Batch 3 on data=2 raises under the table; with rules that leave the batch unsharded the same call
    runs and matches the reference, so the shard_map specs really are the installed rules."""
    mesh_cfg = MeshConfig(data=2, fsdp=1, tensor=1, sequence=4)
    mesh = make_mesh(mesh_cfg)
    q, k, v, d_out, d_lse = _inputs(4, 3, 2)
    pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (3, LENGTH)).copy()

    def ring_fn(q, k, v):
        return sharded_attention(q, k, v, mesh=mesh, chunk_size=4, return_lse=True)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, None, None, True), HEAD_DIM**-0.5)

    with pytest.raises(RingError, match="batch 3 is not divisible by the 2 data×fsdp shards"):
        ring_fn(q, k, v)
    no_batch = tuple((name, None if name == "batch" else axes) for name, axes in flax_rules(mesh))
    with nn.logical_axis_rules(no_batch):
        (out, lse, grads), (out_r, lse_r, grads_r) = _run(ring_fn, reference, q, k, v, d_out, d_lse)
    assert _max_diff(out, out_r) <= 1e-5 and _max_diff(lse, lse_r) <= 1e-5
    assert max(_max_diff(g, g_r) for g, g_r in zip(grads, grads_r, strict=True)) <= 1e-4


def test_ring_refuses_mismatched_rules():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=8))
    q = np.zeros((1, 32, 8, 16), np.float32)
    kv = np.zeros((1, 32, 2, 16), np.float32)
    no_length = tuple((name, None if name == "length" else axes) for name, axes in flax_rules(mesh))
    with nn.logical_axis_rules(no_length):
        with pytest.raises(RingError, match="shard 'length' over exactly that axis"):
            sharded_attention(q, kv, kv, mesh=mesh)
    moved = {"heads": None, "kv_heads": None, "head_dim": "tensor"}
    split_h = tuple((name, moved.get(name, axes)) for name, axes in flax_rules(mesh))
    with nn.logical_axis_rules(split_h):
        with pytest.raises(RingError, match="needs 'head_dim' unsharded"):
            sharded_attention(q, kv, kv, mesh=mesh)


def test_ring_replicates_heads_that_do_not_divide_with_a_warning():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=4, sequence=2))
    q, k, v, d_out, d_lse = _inputs(5, 1, 2)  # 2 kv heads on tensor=4
    pos = np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (1, LENGTH)).copy()

    def ring_fn(q, k, v):
        return sharded_attention(q, k, v, mesh=mesh, chunk_size=4, return_lse=True)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, None, None, True), HEAD_DIM**-0.5)

    with pytest.warns(UserWarning, match="8 query / 2 kv heads do not divide tensor=4; heads are replicated"):
        (out, lse, _), (out_r, lse_r, _) = _run(ring_fn, reference, q, k, v, d_out, d_lse)
    assert _max_diff(out, out_r) <= 1e-5 and _max_diff(lse, lse_r) <= 1e-5
