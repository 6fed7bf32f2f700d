"""The ``cudnn`` local kernel (`attention.cudnn_kernel`): ring hops whose sub-pairs cuDNN's masks cover.

On the emulated 8-device CPU mesh the cuDNN branches run `cudnn_forward`'s ``xla`` path (fp32, so
the ring's fp32 tolerances hold) and the fallback runs interpreted Triton; results are compared
with dense reference attention (out, LSE, dq/dk/dv with an LSE cotangent), and run-time counts
show which sub-pairs ran on cuDNN. The CUDA lowering test exports a bf16 ring step for an H100 and
finds cuDNN's fused attention next to Mosaic GPU (fallback and backward) in the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from attention import attention, choose_kernel, compile_target, instrument
from attention.cudnn_kernel import DIAGONAL, FALLBACK, HIDDEN, VISIBLE, classify
from attention.flash import KV_PAD
from attention.kernels import Target
from attention.layout import from_layout, to_layout
from attention.masks import make_mask
from attention.reference import reference_attention
from attention.strategies import sharded_attention
from model.config import ATTENTION_KERNELS
from sharding import MeshConfig, axis_rules, make_mesh

RING, N_HEADS, KV_HEADS, HEAD_DIM, LENGTH = 8, 8, 2, 16, 64  # GQA 4:1; 8 tokens per shard, halves of 4
CUDNN_FWD = "__cudnn$fmhaSoftmax"
MOSAIC_GPU = "mosaic_gpu_v2"
UNCHECKED = [
    export.DisabledSafetyCheck.custom_call(n)
    for n in (CUDNN_FWD, "__cudnn$fmhaSoftmaxBackward", "mosaic_gpu", MOSAIC_GPU, "__gpu$xla.gpu.triton")
]


@pytest.fixture(autouse=True)
def _rules():
    with axis_rules():
        yield


def _ring_vs_reference(layout: str, packed: bool, causal: bool = True):
    """(out, lse, grads), the reference's, and the run-time counts per ring position."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=RING))
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q, d_out = normal(1, LENGTH, N_HEADS, HEAD_DIM), normal(1, LENGTH, N_HEADS, HEAD_DIM)
    k, v = normal(1, LENGTH, KV_HEADS, HEAD_DIM), normal(1, LENGTH, KV_HEADS, HEAD_DIM)
    d_lse = normal(1, LENGTH, N_HEADS)
    pos = np.arange(LENGTH, dtype=np.int32)[None]
    # Document boundaries off every shard and half-shard boundary, so documents cross shards.
    seg = np.searchsorted([5, 19, 42], pos, side="right").astype(np.int32) if packed else None
    lay = lambda x: None if x is None else to_layout(x, RING, layout)  # noqa: E731

    def ring(q, k, v):
        out, lse = sharded_attention(
            *(lay(x) for x in (q, k, v)),
            mesh=mesh,
            causal=causal,
            q_positions=lay(pos),
            kv_positions=lay(pos),
            q_segment_ids=lay(seg),
            kv_segment_ids=lay(seg),
            kernel="cudnn",
            chunk_size=4,
            return_lse=True,
            counter=counts,
        )
        return from_layout(out, RING, layout), from_layout(lse, RING, layout)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, seg, seg, causal), HEAD_DIM**-0.5)

    def results(fn, q, k, v):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    with instrument.count_work() as counts:
        got, want = jax.jit(lambda *a: (results(ring, *a), results(reference, *a)))(q, k, v)
        jax.block_until_ready(got)
        jax.effects_barrier()
    per = {kind: [counts.get((kind, r), 0) for r in range(RING)] for kind in ("cudnn_fwd", "cudnn_fallback_fwd")}
    return jax.tree.map(np.asarray, got), jax.tree.map(np.asarray, want), per


def _assert_exact(got, want):
    (out, lse, grads), (out_r, lse_r, grads_r) = got, want
    assert np.max(np.abs(out - out_r)) <= 1e-5
    assert np.max(np.abs(lse - lse_r)) <= 1e-5
    for g, g_r in zip(grads, grads_r, strict=True):
        assert np.max(np.abs(g - g_r)) <= 1e-4


def test_zigzag_one_document_runs_every_visible_sub_pair_on_cudnn():
    got, want, per = _ring_vs_reference("zigzag", packed=False)
    _assert_exact(got, want)
    # Shard r against shard j: 2 visible sub-pairs (j != r), or 2 diagonals + 1 visible (j == r):
    # 2·(N − 1) + 3 = 2N + 1 per shard, balanced, and nothing left for the fallback.
    assert per["cudnn_fwd"] == [2 * RING + 1] * RING
    assert per["cudnn_fallback_fwd"] == [0] * RING


def test_contiguous_one_document_runs_on_cudnn():
    got, want, per = _ring_vs_reference("contiguous", packed=False)
    _assert_exact(got, want)
    # Shard r: 4 visible sub-pairs on each of the r earlier blocks, 2 diagonals + 1 visible on its own.
    assert per["cudnn_fwd"] == [4 * r + 3 for r in range(RING)]
    assert per["cudnn_fallback_fwd"] == [0] * RING


def test_packed_documents_fall_back_where_they_cross_and_stay_exact():
    got, want, per = _ring_vs_reference("zigzag", packed=True)
    _assert_exact(got, want)
    assert sum(per["cudnn_fallback_fwd"]) > 0  # sub-pairs holding a document boundary
    assert sum(per["cudnn_fwd"]) > 0  # sub-pairs inside one document still run on cuDNN
    # Fewer sub-pairs than without documents: pairs of disjoint documents are hidden.
    assert sum(per["cudnn_fwd"]) + sum(per["cudnn_fallback_fwd"]) < RING * (2 * RING + 1)


def test_classify_sub_pairs():
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    one = jnp.zeros((1, 4), jnp.int32)
    early, late = pos[:, :4], pos[:, 4:]
    assert int(classify(early, early, one, one, True)) == DIAGONAL
    assert int(classify(late, early, one, one, True)) == VISIBLE
    assert int(classify(early, late, one, one, True)) == HIDDEN
    assert int(classify(early, late, one, one, False)) == VISIBLE
    assert int(classify(early, early, one, one.at[:, 3].set(1), True)) == FALLBACK  # a document boundary
    assert int(classify(late, early.at[:, 3].set(KV_PAD), one, one, True)) == FALLBACK  # a padding key
    assert int(classify(pos[:, ::2], pos[:, 1::2], one, one, True)) == FALLBACK  # interleaved (striped)


def test_cudnn_is_opt_in_and_reaches_the_entry_point():
    assert "cudnn" in ATTENTION_KERNELS
    assert choose_kernel("cudnn") == "cudnn"
    for target in (Target("gpu", 9.0), Target("gpu", 8.0), Target("cpu")):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert choose_kernel("auto", target=target, dtype=dtype, head_dim=64) != "cudnn"
            assert choose_kernel("pallas", target=target, dtype=dtype, head_dim=64) != "cudnn"
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=2), devices=jax.devices()[:2])
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 16, 4, 16), np.float32)
    k, v = (rng.standard_normal((1, 16, 1, 16), np.float32) for _ in range(2))
    pos = to_layout(np.arange(16, dtype=np.int32)[None], 2, "zigzag")
    out = attention(*(to_layout(x, 2, "zigzag") for x in (q, k, v)), impl="ring", mesh=mesh, kernel="cudnn",
                    q_positions=pos, kv_positions=pos)  # fmt: skip
    natural = np.arange(16, dtype=np.int32)[None]
    want, _ = reference_attention(q, k, v, make_mask(natural, natural, None, None, True), 0.25)
    assert np.max(np.abs(from_layout(np.asarray(out), 2, "zigzag") - np.asarray(want))) <= 1e-5


@pytest.fixture
def cudnn_version(monkeypatch):
    """A CPU-only jaxlib has no cuDNN to ask its version: state one (features used: none version-gated)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    from jax._src.lib import cuda_versions

    if cuda_versions is None:
        monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 90800)


def test_ring_with_cudnn_kernel_lowers_for_cuda(cudnn_version):
    """bf16 ring fwd+bwd for an H100 (compute capability 9.0) on a 2-device mesh of host CPU devices."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=2), devices=jax.devices()[:2])
    b, t, h = 1, 256, 64  # 128 tokens per shard: halves of two 64-row Mosaic GPU tiles
    args = [jax.ShapeDtypeStruct((b, t, 4, h), jnp.bfloat16)] + [jax.ShapeDtypeStruct((b, t, 1, h), jnp.bfloat16)] * 2
    pos = to_layout(np.arange(t, dtype=np.int32)[None], 2, "zigzag")

    def loss(q, k, v):
        out = sharded_attention(q, k, v, mesh=mesh, q_positions=pos, kv_positions=pos, kernel="cudnn")
        return jnp.sum(out.astype(jnp.float32))

    with compile_target("gpu", 9.0):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        text = export.export(fn, platforms=["cuda"], disabled_checks=UNCHECKED)(*args).mlir_module()
    assert CUDNN_FWD in text and MOSAIC_GPU in text
    assert "__cudnn$fmhaSoftmaxBackward" not in text  # the backward is ours, from the global LSE
