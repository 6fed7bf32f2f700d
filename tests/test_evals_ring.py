"""Ring prefill on the emulated 8-device mesh equals single-device prefill: logits, next token, cache, generations."""

import jax
import numpy as np
import pytest

import model
from evals.generation import cache_sharding, greedy_generate
from evals.runner import Runner
from model.generate import prefill
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import axis_rules, shard_params
from text import passkey_sample
from text.tokenizer import ByteTokenizer

CFG = model.preset("tiny")
T = 300  # not a multiple of the ring size: the padding path is exercised


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CFG, jax.random.key(1))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, sequence=8))
    tok = ByteTokenizer()
    samples = [passkey_sample(tok, T, d, rng=i) for i, d in enumerate([0.2, 0.8])]
    prompt = np.asarray([s.prompt_ids for s in samples], np.int32)
    return params, shard_params(params, mesh, model.logical_axes(CFG)), mesh, samples, prompt


@pytest.fixture(scope="module")
def reference(setup):
    """Single-device cached prefill: logits for every prompt position and the cache."""
    params, _, _, _, prompt = setup
    cache = model.init_cache(CFG, 2, 312)
    logits, cache = jax.jit(lambda p, x, c: model.Llama(CFG).apply({"params": p}, x, cache=c))(params, prompt, cache)
    return np.asarray(logits), cache


def test_ring_prefill_equals_single_device(setup, reference):
    _, sharded, mesh, _, prompt = setup
    max_len = 312  # what greedy_generate uses for 12 new tokens (T + 12 rounded up to the ring of 8)
    with axis_rules(mesh):
        logits, cache = prefill(
            sharded,
            prompt,
            config=CFG,
            max_len=max_len,
            mesh=mesh,
            cache_sharding=cache_sharding(CFG, mesh, 2, max_len),
        )
    ref_logits, ref_cache = reference
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits[:, -1]), atol=2e-5, rtol=2e-5)
    assert (np.argmax(logits, -1) == np.argmax(ref_logits[:, -1], -1)).all()
    np.testing.assert_allclose(np.asarray(cache["k"])[:, :, :T], np.asarray(ref_cache["k"])[:, :, :T], atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache["v"])[:, :, :T], np.asarray(ref_cache["v"])[:, :, :T], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(cache["positions"]), np.asarray(ref_cache["positions"]))
    assert int(cache["index"]) == T
    # The cache really is spread over the ring: each device holds max_len / 8 slots.
    assert {s.data.shape[2] for s in cache["k"].addressable_shards} == {max_len // 8}


def test_ring_generate_equals_model_generate(setup):
    params, sharded, mesh, _, prompt = setup
    got = greedy_generate(CFG, sharded, prompt, 12, mesh)
    ref = np.asarray(model.generate(CFG, params, prompt, 12))[:, T:]
    np.testing.assert_array_equal(got, ref)


def test_runner_on_mesh_equals_single_device(setup, reference):
    params, sharded, mesh, samples, prompt = setup
    one = Runner(CFG, params, batch_size=2).forced(samples)
    ring = Runner(CFG, sharded, mesh=mesh, batch_size=2).forced(samples)
    for a, b in zip(one, ring, strict=True):
        assert a.argmax_ids == b.argmax_ids
        assert a.answer_logprob == pytest.approx(b.answer_logprob, rel=1e-5, abs=1e-5)
    # Perplexity on the mesh: next-token NLL against the single-device logits (float64 softmax).
    nll_ring = Runner(CFG, sharded, mesh=mesh).token_nll(prompt[:1])
    logits = reference[0][0, :-1].astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = lse - logits[np.arange(T - 1), prompt[0, 1:]]
    np.testing.assert_allclose(nll_ring[0], expected, rtol=1e-5, atol=1e-5)
