"""The full model on an emulated data=2 × sequence=4 mesh with ring attention equals the single-device reference.

Logits and every parameter gradient of a cross-entropy loss, fp32, within 1e-4: in natural
token order, in the zigzag ring layout (tokens, positions, segment ids and targets permuted
with `attention.layout`, logits brought back), and with packed documents crossing shards.
One compiled function per side serves every case (positions and segment ids are always passed).
The same holds for every context-parallel strategy chosen by ``context_parallel`` (ring,
allgather, ulysses, hybrid 2 × 2), on packed documents in the zigzag layout.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from attention import layout
from attention import strategies as attention_strategies
from model.config import ConfigError
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


# Every context-parallel strategy through the model: attention_impl "auto" on the sequence-sharded mesh
# takes `context_parallel`. Tiny has 4 query / 2 kv heads: Ulysses over the 4 sequence shards replicates
# the kv heads to 4, hybrid runs 2 groups × 2.
STRATEGIES = [("ring", 0), ("allgather", 0), ("ulysses", 0), ("hybrid", 2)]


@pytest.mark.parametrize(("strategy", "ulysses_size"), STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_context_parallel_strategy_matches_reference(setup, strategy, ulysses_size, monkeypatch):
    mesh, host, ref_fn, _, sharded = setup
    cfg = CFG.replace(context_parallel=strategy, ulysses_size=ulysses_size)
    assert cfg.attention_impl == "auto"
    used = []
    real = attention_strategies.context_parallel_shard
    monkeypatch.setattr(
        attention_strategies,
        "context_parallel_shard",
        lambda *a, **kw: used.append((kw["strategy"], kw["ulysses_size"])) or real(*a, **kw),
    )
    p_sh = param_shardings(model.abstract_params(CFG), mesh)
    tok_sh = batch_sharding(mesh, (B, T))
    fn = jax.jit(
        axis_rules(mesh)(_fwd_bwd(model.Llama(cfg, mesh=mesh))),
        in_shardings=(p_sh, tok_sh, tok_sh, tok_sh, tok_sh),
        out_shardings=((replicated(mesh), tok_sh), p_sh),
    )
    tokens, positions, segments, targets = _inputs(packed=True)
    (ref_loss, ref_logits), ref_grads = ref_fn(host, tokens, positions, segments, targets)
    moved = layout.to_layout_tree((tokens, positions, segments, targets), RING, "zigzag")
    (loss, logits), grads = fn(sharded, *moved)
    assert used and set(used) == {(strategy, ulysses_size or None)}  # the model really ran this strategy
    assert abs(float(loss) - float(ref_loss)) <= TOL
    assert _max_diff(layout.from_layout(logits, RING, "zigzag"), ref_logits) <= TOL
    assert _max_diff(grads, ref_grads) <= TOL


def test_unknown_context_parallel_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown context_parallel 'bogus'"):
        model.preset("tiny", context_parallel="bogus")
    with pytest.raises(ConfigError, match="ulysses_size must be 0"):
        model.preset("tiny", ulysses_size=-1)


def test_scanned_model_takes_default_positions():
    """Default positions in one document (the cuDNN-eligible form) through the scanned layers equal explicit
    arange positions (the scan carries the layer context, so nothing in it may be a Python bool)."""
    cfg = CFG.replace(attention_impl="reference")
    assert cfg.scan_layers
    net = model.Llama(cfg)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T), dtype=np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    plain, explicit = jax.jit(
        lambda p, t, pos: (net.apply({"params": p}, t), net.apply({"params": p}, t, positions=pos))
    )(_random_params(cfg), tokens, positions)
    assert _max_diff(plain, explicit) <= 1e-6
