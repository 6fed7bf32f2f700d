"""Chunked cross-entropy: equals the full-logits loss in value and gradient, never builds [t, v] logits."""

import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.loss import chunked_cross_entropy, chunked_token_nll, full_cross_entropy
from sharding.mesh import MeshConfig, make_mesh

B, T, D, V = 2, 13, 8, 17


def _inputs(seed=0, t=T):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, t, D)).astype(np.float32)
    head = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, t)).astype(np.int32)
    mask = (rng.random((B, t)) > 0.3).astype(np.float32)
    mask[1, 9:] = 0  # a padded tail
    return hidden, head, targets, mask


def _numpy_reference(hidden, head, targets, mask):
    """float64 loss sum, count and analytic gradients (softmax − onehot)."""
    h, w = hidden.astype(np.float64), head.astype(np.float64)
    logits = h @ w
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(V)[targets]
    loss = -(np.log((p * onehot).sum(-1)) * mask).sum()
    dlogits = (p - onehot) * mask[..., None]
    return loss, mask.sum(), dlogits @ w.T, np.einsum("btd,btv->dv", h, dlogits)


# chunk divides t / does not (padded tail) / one chunk larger than t
@pytest.mark.parametrize("t, chunk", [(12, 4), (13, 4), (13, 64)])
def test_chunked_matches_float64_reference(t, chunk):
    hidden, head, targets, mask = _inputs(t=t)
    loss_ref, count_ref, dh_ref, dw_ref = _numpy_reference(hidden, head, targets, mask)

    def f(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk)[0]

    loss, count = jax.jit(lambda h, w: chunked_cross_entropy(h, w, targets, mask, chunk))(hidden, head)
    dh, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(hidden, head)
    assert loss.dtype == jnp.float32
    assert float(count) == count_ref
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), dh_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-6)
    # Masked positions get no gradient at all.
    assert np.all(np.asarray(dh)[mask == 0] == 0)


def test_chunked_equals_full_logits_loss_and_gradient():
    hidden, head, targets, mask = _inputs(1)
    mask = mask.astype(bool)  # the data pipeline may hand a bool mask

    def chunked(h, w):
        return chunked_cross_entropy(h, w, targets, mask, 4)[0]

    def full(h, w):
        return full_cross_entropy(h, w, targets, mask)[0]

    np.testing.assert_allclose(float(jax.jit(chunked)(hidden, head)), float(jax.jit(full)(hidden, head)), rtol=1e-6)
    g_c = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
    g_f = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, head)
    for a, b in zip(g_c, g_f, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _all_shapes(jaxpr) -> set[tuple[int, ...]]:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes |= _all_shapes(sub)
    return shapes


def test_full_logits_never_materialised_forward_or_backward():
    hidden, head, targets, mask = _inputs()
    chunk = 4  # 4 chunks of ≤ 4 positions

    def f(h, w):
        return chunked_cross_entropy(h, w, targets, mask, chunk)[0]

    shapes = _all_shapes(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(hidden, head).jaxpr)
    biggest = max((s for s in shapes if s and s[-1] == V), key=np.prod)
    assert np.prod(biggest) <= B * chunk * V, biggest  # one chunk's logits at most
    # The full-logits version does build them (so the check above can fail).
    full = _all_shapes(jax.make_jaxpr(jax.grad(lambda h: full_cross_entropy(h, head, targets, mask)[0]))(hidden).jaxpr)
    assert (B, T, V) in full


def test_bf16_hidden_gives_fp32_loss_close_to_fp32():
    hidden, head, targets, mask = _inputs(2)
    f = jax.jit(lambda h: chunked_cross_entropy(h, head, targets, mask, 5)[0])
    loss32, loss16 = f(jnp.asarray(hidden)), f(jnp.asarray(hidden, jnp.bfloat16))
    assert loss16.dtype == jnp.float32
    # bf16 inputs carry ~3 significant digits; the fp32 reductions keep the sum close.
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2)


@pytest.mark.parametrize("t, chunk", [(12, 4), (13, 4), (13, 5), (13, 64)])
def test_token_nll_matches_float64_reference_per_position(t, chunk):
    hidden, head, targets, _ = _inputs(t=t)
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    expected = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]  # [b, t], position order
    got = jax.jit(lambda h, w: chunked_token_nll(h, w, targets, chunk))(hidden, head)
    assert got.shape == (B, t) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_token_nll_sums_to_the_training_loss():
    hidden, head, targets, mask = _inputs(4)
    nll = chunked_token_nll(hidden, head, targets, 4)
    loss, _ = chunked_cross_entropy(hidden, head, targets, mask, 4)
    np.testing.assert_allclose(float(jnp.sum(nll * mask)), float(loss), rtol=1e-6)


def test_bad_chunk_is_rejected():
    hidden, head, targets, mask = _inputs()
    with pytest.raises(ValueError, match="loss chunk"):
        chunked_cross_entropy(hidden, head, targets, mask, 0)
    with pytest.raises(ValueError, match="loss chunk"):
        chunked_token_nll(hidden, head, targets, 0)


def test_bf16_head_gradient_summed_over_chunks_in_fp32():
    """256 chunks of bf16 work: the fp32 head's gradient must be no less accurate than one whole-sequence matmul.

    Summing per-chunk head gradients in bf16 (casting the head once, outside the scan) gave ~10x the
    one-matmul error here.
    """
    import ml_dtypes

    rng = np.random.default_rng(3)
    t = 2048
    hidden = rng.normal(size=(1, t, D)).astype(ml_dtypes.bfloat16)
    head = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(1, t)).astype(np.int32)
    mask = np.ones((1, t), np.float32)
    head16 = head.astype(ml_dtypes.bfloat16).astype(np.float32)  # what the bf16 matmul sees
    *_, dw_ref = _numpy_reference(hidden.astype(np.float32), head16, targets, mask)

    def err(chunk):
        grad = jax.jit(jax.grad(lambda w: chunked_cross_entropy(jnp.asarray(hidden), w, targets, mask, chunk)[0]))
        dw = grad(head)
        assert dw.dtype == jnp.float32
        return np.linalg.norm(np.asarray(dw, np.float64) - dw_ref) / np.linalg.norm(dw_ref)

    assert err(8) <= err(t)


def test_on_a_sequence_mesh_the_loss_follows_the_installed_rules_and_only_reduces():
    """Strided chunks on the 8-device ring: same numbers as one device, the chunks pinned by the caller's rules."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, sequence=8))
    rules = (("batch", ("data", "fsdp")), ("length", "sequence"), ("vocab", "tensor"), ("embed", None))
    rng = np.random.default_rng(5)
    b, t, d, v = 2, 256, 16, 32
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    head = rng.normal(size=(d, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    sharded = jax.device_put(hidden, NamedSharding(mesh, P(None, "sequence", None)))

    def f(h, w):
        with nn.logical_axis_rules(rules):
            loss = chunked_cross_entropy(h, w, targets, mask, 64, mesh)[0]
            return loss, chunked_token_nll(h, w, targets, 64, mesh)

    lowered = jax.jit(f).lower(sharded, head)
    assert "sharding_constraint" in lowered.as_text()
    # Only the sums are reduced across the ring; contiguous chunks (each on one device) compile to
    # all-to-all + collective-permute reshuffles here instead.
    compiled = lowered.compile().as_text()
    assert set(re.findall(r"all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce", compiled)) == {
        "all-reduce"
    }
    loss, nll = jax.jit(f)(sharded, head)
    np.testing.assert_allclose(float(loss), float(chunked_cross_entropy(hidden, head, targets, mask, 64)[0]), rtol=1e-6)
    # Per position the sharded reductions round differently in the last fp32 bits.
    np.testing.assert_allclose(
        np.asarray(nll), np.asarray(chunked_token_nll(hidden, head, targets, 64)), rtol=1e-5, atol=1e-5
    )
