"""Ring prefill on the emulated 8-device mesh equals single-device prefill: logits, next token, cache, generations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from evals import passkey_sample
from evals.ring_prefill import ring_generate, ring_prefill
from evals.runner import Runner
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import batch_sharding, shard_params
from train.tokenizer import ByteTokenizer

CFG = model.preset("tiny")
T = 300  # not a multiple of the ring size: the padding path is exercised


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CFG, jax.random.key(1))
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, sequence=8))
    tok = ByteTokenizer()
    samples = [passkey_sample(tok, T, d, rng=i) for i, d in enumerate([0.2, 0.8])]
    prompt = np.asarray([s.prompt_ids for s in samples], np.int32)
    return params, shard_params(params, mesh, CFG), mesh, samples, prompt


def test_ring_prefill_equals_single_device(setup):
    params, sharded, mesh, _, prompt = setup
    t_pad, max_len = 304, 312  # what ring_generate uses for 12 new tokens: one compile for both tests
    tokens = np.zeros((2, t_pad), np.int32)
    tokens[:, :T] = prompt
    logits, cache = ring_prefill(
        sharded, jax.device_put(tokens, batch_sharding(mesh, tokens.shape)), config=CFG, mesh=mesh, length=T,
        max_len=max_len,
    )  # fmt: skip
    ref_cache = model.init_cache(CFG, 2, max_len)
    ref_logits, ref_cache = model.Llama(CFG).apply({"params": params}, jnp.asarray(prompt), cache=ref_cache)
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
    got = ring_generate(CFG, sharded, prompt, 12, mesh)
    ref = np.asarray(model.generate(CFG, params, prompt, 12))[:, T:]
    np.testing.assert_array_equal(got, ref)


def test_runner_on_mesh_equals_single_device(setup):
    params, sharded, mesh, samples, _ = setup
    one = Runner(CFG, params, batch_size=2).forced(samples)
    ring = Runner(CFG, sharded, mesh=mesh, batch_size=2).forced(samples)
    for a, b in zip(one, ring, strict=True):
        assert a.argmax_ids == b.argmax_ids
        assert a.answer_logprob == pytest.approx(b.answer_logprob, rel=1e-5, abs=1e-5)
    nll_one = Runner(CFG, params).token_nll(np.asarray([samples[0].prompt_ids]))
    nll_ring = Runner(CFG, sharded, mesh=mesh).token_nll(np.asarray([samples[0].prompt_ids]))
    np.testing.assert_allclose(nll_ring, nll_one, rtol=1e-5, atol=1e-5)
