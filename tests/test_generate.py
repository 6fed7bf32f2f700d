"""KV cache and jit-compiled generation against transformers: greedy token for token, eos
stopping and padding, deterministic nucleus sampling, one compiled program per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import (
    one_torch_thread,  # noqa: F401  (module fixture)
    ringllama_from_hf,
    tiny_hf_model,
)

import model
from model.generate import _generate, sample_token

NEW = 40  # new tokens per greedy comparison (the issue asks for ≥ 32)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [float(x) for x in np.linspace(1.0, 1.3, 8)],
    "long_factor": [float(x) for x in np.linspace(1.0, 6.0, 8)],
    "original_max_position_embeddings": 32,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prompts(batch: int, length: int, seed: int) -> np.ndarray:
    # Tokens ≥ 3 keep bos/eos/pad (1/2/0) out of the prompt.
    return np.random.default_rng(seed).integers(3, 128, (batch, length)).astype(np.int32)


def hf_greedy(hf, prompt: np.ndarray, new: int, eos=None) -> np.ndarray:
    """transformers' greedy continuation; ``eos=None`` disables stopping without touching the
    logits (``min_new_tokens`` would mask eos, changing the argmax)."""
    gen = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    saved, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None  # else it is the fallback
    try:
        with torch.no_grad():
            return hf.generate(torch.as_tensor(prompt, dtype=torch.long), generation_config=gen).numpy()
    finally:
        hf.generation_config.eos_token_id = saved


@pytest.fixture(scope="module")
def llama3():
    hf = tiny_hf_model(seed=11, max_position_embeddings=256, rope_scaling=LLAMA3)
    return (hf, *ringllama_from_hf(hf))


# ----------------------------------------------------------------------------- KV cache


def test_cached_decoding_equals_the_full_forward(llama3):
    _, cfg, params = llama3
    toks = jnp.asarray(prompts(2, 20, seed=1))
    net = model.Llama(cfg)
    full = np.asarray(net.apply({"params": params}, toks))
    step = jax.jit(lambda p, t, c: net.apply({"params": p}, t, cache=c))
    cache = model.init_cache(cfg, 2, 24)
    pieces = []
    # Chunks of 4 (prefill, then extending a filled cache), then single tokens: every path through the cache.
    for lo, hi in [(0, 4), (4, 8), (8, 12), (12, 16), *[(i, i + 1) for i in range(16, 20)]]:
        logits, cache = step(params, toks[:, lo:hi], cache)
        pieces.append(np.asarray(logits))
    assert int(cache["index"]) == 20
    np.testing.assert_array_equal(np.asarray(cache["positions"][:, :20]), np.broadcast_to(np.arange(20), (2, 20)))
    assert np.all(np.asarray(cache["positions"][:, 20:]) == model.init_cache(cfg, 1, 1)["positions"][0, 0])
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- greedy vs transformers


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_equals_transformers(llama3, batch):
    hf, cfg, params = llama3
    prompt = prompts(batch, 12, seed=batch)
    ref = hf_greedy(hf, prompt, NEW)  # no eos on either side: all NEW tokens compared
    got = np.asarray(model.generate(cfg, params, prompt, NEW, eos_ids=()))
    assert got.shape == ref.shape == (batch, 12 + NEW)
    np.testing.assert_array_equal(got, ref)
    assert len(set(got[:, 12:].ravel().tolist())) > 3  # a real continuation, not one token repeated


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("dynamic", {"max_position_embeddings": 32, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}),
        ("longrope", {"max_position_embeddings": 128, "rope_scaling": LONGROPE}),
    ],
)
def test_greedy_equals_transformers_across_the_rope_switch(name, overrides):
    """Decoding from 12 to 52 tokens crosses 32, where dynamic θ starts growing and longrope
    switches to its long factors: each new token's rotation follows its own position, as in HF."""
    hf = tiny_hf_model(seed=13, **overrides)
    cfg, params = ringllama_from_hf(hf)
    prompt = prompts(2, 12, seed=5)
    ref = hf_greedy(hf, prompt, NEW)
    got = np.asarray(model.generate(cfg, params, prompt, NEW, eos_ids=()))
    np.testing.assert_array_equal(got, ref)


# ----------------------------------------------------------------------------- eos


def test_eos_stops_a_row_and_pads_after_it(llama3):
    hf, cfg, params = llama3
    # A prompt pair and an eos that row 0 produces early and row 1 never produces (same shapes: no recompiles).
    for seed in range(20, 30):
        prompt = prompts(2, 12, seed=seed)
        free = np.asarray(model.generate(cfg, params, prompt, NEW, eos_ids=()))[:, 12:]
        candidates = [t for t in free[0, 2:12].tolist() if t not in free[1].tolist()]
        if candidates:
            break
    assert candidates
    eos = candidates[0]
    stop = free[0].tolist().index(eos)
    unused = max(set(range(3, 128)) - set(free.ravel().tolist()))  # a second eos id that never fires
    got = np.asarray(model.generate(cfg, params, prompt, NEW, eos_ids=(unused, eos), pad_id=0))
    np.testing.assert_array_equal(got[0, 12 : 12 + stop + 1], free[0, : stop + 1])  # eos itself is kept
    assert stop + 1 < NEW and np.all(got[0, 12 + stop + 1 :] == 0)
    np.testing.assert_array_equal(got[1, 12:], free[1])  # the other row runs on
    # transformers does the same: finished rows are padded with pad_token_id.
    ref = hf_greedy(hf, prompt, NEW, eos=[unused, eos])
    np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
    # Batch 1: transformers stops at eos; ringllama returns the same tokens, then pads.
    one = np.asarray(model.generate(cfg, params, prompt[:1], NEW, eos_ids=(eos,)))
    ref_one = hf_greedy(hf, prompt[:1], NEW, eos=eos)
    assert ref_one.shape[1] == 12 + stop + 1
    np.testing.assert_array_equal(one[:, : ref_one.shape[1]], ref_one)
    assert np.all(one[0, ref_one.shape[1] :] == eos)  # default pad is the first eos id


# ----------------------------------------------------------------------------- sampling


def test_sampling_is_deterministic_per_key_and_tiny_top_p_is_greedy(llama3):
    _, cfg, params = llama3
    prompt = prompts(2, 12, seed=3)
    greedy = np.asarray(model.generate(cfg, params, prompt, NEW, eos_ids=()))

    def sample(seed, temperature=1.0, top_p=0.9):
        key = jax.random.key(seed)
        return np.asarray(
            model.generate(cfg, params, prompt, NEW, temperature=temperature, top_p=top_p, key=key, eos_ids=())
        )

    a = sample(0)
    np.testing.assert_array_equal(a, sample(0))
    assert not np.array_equal(a, sample(1))
    assert not np.array_equal(a[:, 12:], greedy[:, 12:])
    np.testing.assert_array_equal(sample(1, top_p=1e-6), greedy)
    np.testing.assert_array_equal(sample(2, temperature=1e-4, top_p=1.0), greedy)


def _hf_nucleus(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """transformers' own warpers: which tokens keep a finite score."""
    scores = torch.as_tensor(logits)[None]
    scores = transformers.TemperatureLogitsWarper(temperature)(None, scores)
    scores = transformers.TopPLogitsWarper(top_p)(None, scores)
    return torch.isfinite(scores[0]).numpy()


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.9), (0.7, 0.5), (1.3, 0.99)])
def test_nucleus_sampling_keeps_transformers_set_and_its_distribution(temperature, top_p):
    logits = np.random.default_rng(4).standard_normal(64).astype(np.float32) * 2.0
    kept = _hf_nucleus(logits, temperature, top_p)
    assert 1 < kept.sum() < 64
    n = 20_000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda k: sample_token(jnp.asarray(logits)[None], k, temperature, top_p)[0]))
    samples = np.asarray(draw(keys))
    counts = np.bincount(samples, minlength=64)
    assert np.all(counts[~kept] == 0)
    p = np.where(kept, np.exp((logits - logits.max()) / temperature), 0.0)
    p /= p.sum()
    # Each kept token's frequency within 5 standard errors of its renormalised probability.
    np.testing.assert_array_less(np.abs(counts / n - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-9)


def test_greedy_sample_token_is_argmax():
    logits = jnp.asarray(np.random.default_rng(5).standard_normal((3, 50)), jnp.float32)
    np.testing.assert_array_equal(sample_token(logits, jax.random.key(0), 0.0, 1.0), np.argmax(logits, -1))


# ----------------------------------------------------------------------------- compile once


def test_generate_compiles_once_per_shape(llama3):
    """New prompts, weights, sampling settings, eos ids and pad ids reuse the compiled programs."""
    _, cfg, params = llama3
    prompt = prompts(2, 12, seed=9)
    model.generate(cfg, params, prompt, NEW, eos_ids=())  # greedy: compiled here or by an earlier test
    before = _generate._cache_size()
    model.generate(cfg, params, prompt[::-1], NEW, eos_ids=())
    model.generate(cfg, jax.tree.map(lambda x: x * 1.01, params), prompt, NEW, eos_ids=())
    assert _generate._cache_size() == before
    model.generate(cfg, params, prompt, NEW, eos_ids=(), temperature=0.5, top_p=0.8)
    sampling = _generate._cache_size()
    assert sampling <= before + 1  # the sampling program (unless an earlier test compiled it)
    model.generate(cfg, params, prompt, NEW, eos_ids=(), temperature=0.9, top_p=0.3, key=jax.random.key(3))
    model.generate(cfg, params, prompt, NEW, eos_ids=(), temperature=1.7, top_p=1.0, key=jax.random.key(4))
    model.generate(cfg, params, prompt, NEW, eos_ids=(5, 7, 9), pad_id=3, temperature=0.8)
    assert _generate._cache_size() == sampling
    model.generate(cfg, params, prompt, NEW, eos_ids=(5,), pad_id=1)  # greedy with stop ids: no recompile
    assert _generate._cache_size() == sampling
    # A ring-attention config decodes unsharded through the same program (it has no mesh here).
    ring = model.generate(cfg.replace(attention_impl="ring"), params, prompt, NEW, eos_ids=())
    np.testing.assert_array_equal(ring, model.generate(cfg, params, prompt, NEW, eos_ids=()))
    assert _generate._cache_size() == sampling


def test_generate_rejects_bad_arguments(llama3):
    _, cfg, params = llama3
    prompt = prompts(1, 4, seed=0)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        model.generate(cfg, params, prompt, 0)
    with pytest.raises(ValueError, match="0 < top_p <= 1"):
        model.generate(cfg, params, prompt, 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature >= 0"):
        model.generate(cfg, params, prompt, 4, temperature=-1.0)
