"""The full model on an emulated data=2 × sequence=4 mesh with ring attention equals the single-device reference.

Logits and every parameter gradient of a cross-entropy loss, fp32, within 1e-4: in natural
token order, in the zigzag ring layout (tokens, positions, segment ids and targets permuted
with `attention.layout`, logits brought back), and with packed documents crossing shards.
One compiled function per side serves every case (positions and segment ids are always passed).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from attention import layout
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import axis_rules, batch_sharding, param_shardings, replicated

B, T, RING = 2, 32, 4
CFG = model.preset("tiny", attention_chunk=4)  # chunks of 4 inside each 8-token shard: the chunk loops run
TOL = 1e-4


def _random_params(cfg, seed=0):
    """Host params of the right shapes (no init compile): normal(0.02) kernels, norms near 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(lambda b: b.value, model.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))

    def draw(path, s):
        if path[-1].key == "scale":  # RMSNorm scales
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _loss(net, params, tokens, positions, segment_ids, targets):
    logits = net.apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits


def _fwd_bwd(net):
    return jax.value_and_grad(functools.partial(_loss, net), has_aux=True)


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1, sequence=RING))
    host = _random_params(CFG)
    ref_fn = jax.jit(_fwd_bwd(model.Llama(CFG.replace(attention_impl="reference"))))
    p_sh = param_shardings(model.abstract_params(CFG), mesh)
    tok_sh = batch_sharding(mesh, (B, T))
    ring_fn = jax.jit(
        axis_rules(mesh)(_fwd_bwd(model.Llama(CFG.replace(attention_impl="ring"), mesh=mesh))),
        in_shardings=(p_sh, tok_sh, tok_sh, tok_sh, tok_sh),
        out_shardings=((replicated(mesh), tok_sh), p_sh),
    )
    return mesh, host, ref_fn, ring_fn, jax.device_put(host, p_sh)


def _inputs(packed: bool):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32)
    targets = rng.integers(0, CFG.vocab_size, (B, T), dtype=np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    segments = np.zeros((B, T), np.int32)
    if packed:
        # Documents of lengths 11+21 and 5+13+14: boundaries fall inside ring shards (8 tokens each).
        for row, lengths in enumerate([(11, 21), (5, 13, 14)]):
            start = 0
            for doc, n in enumerate(lengths):
                segments[row, start : start + n] = doc
                positions[row, start : start + n] = np.arange(n)
                start += n
    return tokens, positions, segments, targets


def _max_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("ring_layout,packed", [("contiguous", False), ("zigzag", False), ("zigzag", True)])
def test_ring_model_matches_reference(setup, ring_layout, packed):
    mesh, host, ref_fn, ring_fn, sharded = setup
    tokens, positions, segments, targets = _inputs(packed)
    (ref_loss, ref_logits), ref_grads = ref_fn(host, tokens, positions, segments, targets)

    moved = layout.to_layout_tree((tokens, positions, segments, targets), RING, ring_layout)
    (loss, logits), grads = ring_fn(sharded, *moved)
    assert logits.sharding.spec == batch_sharding(mesh, (B, T)).spec  # logits stay sequence-sharded
    assert grads["layers"]["attn"]["q_proj"]["kernel"].sharding.is_equivalent_to(
        param_shardings(model.abstract_params(CFG), mesh)["layers"]["attn"]["q_proj"]["kernel"], 4
    )
    logits = layout.from_layout(logits, RING, ring_layout)
    assert abs(float(loss) - float(ref_loss)) <= TOL
    assert _max_diff(logits, ref_logits) <= TOL
    assert _max_diff(grads, ref_grads) <= TOL
    # Not vacuous: the gradients being compared are far from zero.
    assert float(np.max(np.abs(np.asarray(ref_grads["layers"]["attn"]["k_proj"]["kernel"])))) > 1e-3


def test_layout_needs_its_positions(setup):
    """Control: zigzag tokens with natural-order positions give different logits (the check above has teeth)."""
    _, host, ref_fn, ring_fn, sharded = setup
    tokens, positions, segments, targets = _inputs(False)
    (_, ref_logits), _ = ref_fn(host, tokens, positions, segments, targets)
    moved = layout.to_layout_tree((tokens, segments, targets), RING, "zigzag")
    (_, logits), _ = ring_fn(sharded, moved[0], positions, moved[1], moved[2])
    assert _max_diff(layout.from_layout(logits, RING, "zigzag"), ref_logits) > 1e-2
