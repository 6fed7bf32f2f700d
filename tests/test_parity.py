"""The Flax Llama is the transformers Llama: logits parity (fp32, max |Δ| ≤ 1e-6·max |logit|) across rope types,
GQA ratios, tied heads, odd head sizes, scanned/unrolled and rematerialised layers, packed
documents; gradients through remat; parameter logical axes; bf16 compute.

Weights move from transformers to ringllama through `convert.names` only
(`hf_fixtures.ringllama_from_hf`), never through a hub.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import (
    hf_logits,
    one_torch_thread,  # noqa: F401  (module fixture)
    ringllama_from_hf,
    tiny_hf_model,
)

import model
from convert import names

# fp32 parity, relative to the largest reference value: max |Δ| ≤ RTOL · max |ref|. Measured on CPU
# (jax 0.10, torch 2.13, one torch thread): logits ≤ 4.6e-7 (gqa_ratio4), packed documents ≤ 5.0e-7,
# gradients ≤ 5.7e-7 — a few fp32 ulps (2^-23 ≈ 1.2e-7). A wrong rope or a transposed tensor moves
# them by O(1).
RTOL = 1e-6
# A change no fp32 parity check here would allow: what "the test can tell" checks must exceed.
VISIBLE = 1e-4

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [float(x) for x in np.linspace(1.0, 1.3, 8)],
    "long_factor": [float(x) for x in np.linspace(1.0, 6.0, 8)],
    "original_max_position_embeddings": 32,
}
# name: (transformers overrides, ringllama overrides, sequence length, position offsets or None).
# Offsets shift explicit positions (as a sequence shard passes its global ones) without new shapes,
# so each case compiles once; None runs the default positions 0..length-1.
# The tiny base: vocab 128, hidden 64, mlp 96, 2 layers, 4 heads, 2 kv heads (GQA ratio 2), head_dim 16, θ 10000.
CASES = {
    "default": ({}, {}, 24, None),
    "linear": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {}, 24, None),
    # dynamic: θ grows with the largest position once past max_position_embeddings (32): largest
    # position + 1 = 24, 32 (unchanged), 33, 80. Increasing, because transformers keeps the largest θ it saw.
    "dynamic": (
        {"max_position_embeddings": 32, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
        {},
        24,
        [0, 8, 9, 56],
    ),
    "yarn": (
        {
            "max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        },
        {},
        48,
        None,
    ),
    "yarn_mscale_no_truncate": (
        {
            "max_position_embeddings": 128,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
                "truncate": False,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
        },
        {},
        48,
        None,
    ),
    "llama3": (
        {"max_position_embeddings": 256, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 32}},
        {},
        24,
        [0, 1000],
    ),
    # longrope: short factors while the largest position + 1 ≤ 32, long ones beyond: 24, 32 | 33, 64.
    "longrope": ({"max_position_embeddings": 128, "rope_scaling": LONGROPE}, {}, 24, [0, 8, 9, 40]),
    "mha_ratio1": ({"num_attention_heads": 8, "num_key_value_heads": 8}, {}, 20, None),
    "gqa_ratio4": ({"num_attention_heads": 8, "num_key_value_heads": 2}, {}, 20, None),
    "mqa_ratio8": ({"num_attention_heads": 8, "num_key_value_heads": 1}, {}, 20, None),
    "tied": ({"tie_word_embeddings": True}, {}, 20, None),
    "head_dim_32": ({"head_dim": 32}, {}, 20, None),
    "head_dim_24_mha": ({"head_dim": 24, "num_key_value_heads": 4}, {}, 20, None),
    "unrolled_llama3": (
        {"max_position_embeddings": 256, "rope_scaling": {**LLAMA3, "original_max_position_embeddings": 16}},
        {"scan_layers": False},
        40,
        None,
    ),
    "remat_full_scan": ({}, {"remat_policy": "full"}, 20, None),
    "remat_dots_unrolled": ({}, {"remat_policy": "dots", "scan_layers": False}, 20, None),
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length)).astype(np.int32)


@functools.cache
def forward(cfg: model.LlamaConfig):
    """One jitted apply per config (re-traced only for new shapes)."""
    net = model.Llama(cfg)
    return jax.jit(lambda p, t, pos, seg: net.apply({"params": p}, t, positions=pos, segment_ids=seg))


def ours(cfg, params, toks, positions=None, segment_ids=None) -> np.ndarray:
    return np.asarray(forward(cfg)(params, jnp.asarray(toks), positions, segment_ids))


def hf_logits_at(hf, toks: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    if positions is None:
        return hf_logits(hf, toks)
    with torch.no_grad():
        pos = torch.as_tensor(positions, dtype=torch.long)
        return hf(torch.as_tensor(toks, dtype=torch.long), position_ids=pos).logits.numpy()


def case_inputs(name: str):
    """(transformers model, config, params, tokens, [positions or None, ...]) for a case."""
    hf_over, our_over, length, offsets = CASES[name]
    hf = tiny_hf_model(seed=len(name), **hf_over)
    cfg, params = ringllama_from_hf(hf, **our_over)
    toks = tokens(2, length, seed=length)
    base = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
    return hf, cfg, params, toks, [None] if offsets is None else [base + o for o in offsets]


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    hf, cfg, params, toks, position_sets = case_inputs(name)
    for key, value in CASES[name][1].items():
        assert getattr(cfg, key) == value
    if "layers" in params:
        assert params["layers"]["attn"]["q_proj"]["kernel"].shape[0] == cfg.num_layers
    for positions in position_sets:
        ref = hf_logits_at(hf, toks, positions)
        got = ours(cfg, params, toks, None if positions is None else jnp.asarray(positions))
        assert got.shape == ref.shape == (2, toks.shape[1], 128)
        err = float(np.max(np.abs(got - ref)))
        where = "default positions" if positions is None else f"largest position {positions.max()}"
        assert err <= RTOL * np.max(np.abs(ref)), f"{name}, {where}: max |Δ| {err:.2e}"


def test_position_offsets_matter_only_where_the_rope_says_so():
    """RoPE is relative: shifting every position leaves llama3's logits alone, while crossing the
    dynamic / longrope thresholds changes them — so the cases above are not vacuous. Reuses their shapes."""
    for name, shift, changes in (("llama3", 1000, False), ("dynamic", 56, True), ("longrope", 40, True)):
        _, cfg, params, toks, _ = case_inputs(name)
        base = np.broadcast_to(np.arange(toks.shape[1], dtype=np.int32), toks.shape)
        near = ours(cfg, params, toks, jnp.asarray(base))
        far = ours(cfg, params, toks, jnp.asarray(base + shift))
        change = float(np.max(np.abs(far - near)))
        assert (change > 10 * VISIBLE) if changes else (change <= RTOL * np.max(np.abs(near))), (name, change)


# ----------------------------------------------------------------------------- packed documents


@pytest.fixture(scope="module")
def llama3_pair():
    hf = tiny_hf_model(
        seed=7, max_position_embeddings=256, rope_scaling={**LLAMA3, "original_max_position_embeddings": 16}
    )
    return (hf, *ringllama_from_hf(hf))


def test_packed_documents_equal_separate_runs(llama3_pair):
    hf, cfg, params = llama3_pair
    # Row 0 packs three documents, row 1 holds one; positions restart at 0 in each document.
    lengths = [[9, 13, 10], [32]]
    toks = tokens(2, 32, seed=3)
    segment_ids = np.stack([np.repeat(np.arange(1, len(row) + 1), row) for row in lengths]).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(n) for n in row]) for row in lengths]).astype(np.int32)
    packed = ours(cfg, params, toks, jnp.asarray(positions), jnp.asarray(segment_ids))
    for r, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = hf_logits(hf, toks[r : r + 1, start : start + n])[0]
            err = np.max(np.abs(packed[r, start : start + n] - alone))
            assert err <= RTOL * np.max(np.abs(alone)), (r, start, err)
            start += n
    # Without segment ids the later documents see the earlier ones: the test can tell.
    unmasked = ours(cfg, params, toks, jnp.asarray(positions), None)
    assert np.max(np.abs(unmasked[0, 9:] - packed[0, 9:])) > 1e-3


# ----------------------------------------------------------------------------- gradients


def test_gradients_with_remat_match_torch(llama3_pair):
    """Training sees the same function: d(loss)/d(params) through scan + remat equals torch autograd."""
    hf, cfg, params = llama3_pair
    cfg = cfg.replace(remat_policy="dots_with_no_batch_dims")
    # Token 0 is the pad id: transformers' nn.Embedding(padding_idx=0) never gives that row a gradient.
    toks = 1 + tokens(2, 24, seed=5) % 127
    weights = np.random.default_rng(6).standard_normal((2, 24, 128)).astype(np.float32)

    def loss(p):
        return jnp.sum(model.Llama(cfg).apply({"params": p}, jnp.asarray(toks)) * weights)

    grads = jax.jit(jax.grad(loss))(params)
    hf.zero_grad()
    out = hf(torch.as_tensor(toks, dtype=torch.long)).logits
    (out * torch.as_tensor(weights)).sum().backward()
    ref = {k: p.grad.double().numpy() for k, p in hf.named_parameters()}
    grads = jax.tree.map(np.asarray, grads)
    for hf_name, (rule, layer) in names.expected_tensors(cfg).items():
        got = names.flax_to_hf(hf_name, np.asarray(names.get_param(grads, rule, layer, cfg)), rule, cfg)
        scale = np.max(np.abs(ref[hf_name]))
        assert scale > 0
        np.testing.assert_allclose(got, ref[hf_name], atol=RTOL * scale, rtol=0, err_msg=hf_name)


# ----------------------------------------------------------------------------- parameters

AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"}


@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_logical_axes_of_its_rank(scan):
    cfg = model.preset("tiny", scan_layers=scan, head_dim=24)
    axes = model.logical_axes(cfg)
    shapes = jax.tree.map(lambda x: x.shape, nn.meta.unbox(model.abstract_params(cfg)))
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    assert flat_axes.keys() == flat_shapes.keys() and len(flat_axes) == (9 + 3 if scan else 9 * 2 + 3)
    for path, names_ in flat_axes.items():
        shape = flat_shapes[path]
        where = jax.tree_util.keystr(path)
        assert len(names_) == len(shape), where
        assert set(names_) <= AXIS_NAMES and len(set(names_)) == len(names_), where
        in_layer = "layers" in where
        assert (names_[0] == "layers") == (in_layer and scan), where
        if in_layer and scan:
            assert shape[0] == cfg.num_layers, where
        size = {"vocab": 256, "embed": 64, "heads": 4, "kv_heads": 2, "head_dim": 24, "mlp": 128, "layers": 2}
        assert shape == tuple(size[n] for n in names_), where


def test_init_is_deterministic_and_lm_head_follows_tying():
    cfg = model.preset("tiny")
    a, b, c = (jax.device_get(model.init_params(cfg, jax.random.key(k))) for k in (1, 1, 2))  # one compile
    assert jax.tree.map(np.shape, a) == jax.tree.map(lambda x: x.shape, nn.meta.unbox(model.abstract_params(cfg)))
    assert model.count_params(a) == cfg.num_params()
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert not np.array_equal(a["embed_tokens"]["embedding"], c["embed_tokens"]["embedding"])
    assert float(np.std(a["embed_tokens"]["embedding"])) == pytest.approx(0.02, rel=0.05)
    np.testing.assert_array_equal(a["norm"]["scale"], 1.0)
    np.testing.assert_array_equal(model.lm_head_kernel(a, cfg), a["lm_head"]["kernel"])
    assert a["layers"]["mlp"]["up_proj"]["kernel"].shape == (cfg.num_layers, 64, 128)
    tied_cfg = cfg.replace(tie_word_embeddings=True)
    assert "lm_head" not in model.abstract_params(tied_cfg)
    tied = {k: v for k, v in a.items() if k != "lm_head"}
    np.testing.assert_array_equal(model.lm_head_kernel(tied, tied_cfg), a["embed_tokens"]["embedding"].T)


# ----------------------------------------------------------------------------- bf16

# Documented bound (model/__init__.py): bf16 compute keeps logits within 2^-6·max|logit| of fp32.
BF16_BOUND = 2.0**-6


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_stays_close_to_fp32(llama3_pair, param_dtype):
    hf, cfg, params = llama3_pair
    cfg16 = cfg.replace(dtype="bfloat16", param_dtype=param_dtype)
    params16 = jax.tree.map(lambda x: x.astype(param_dtype), params)
    toks = tokens(2, 32, seed=8)
    ref = hf_logits(hf, toks)
    out = model.Llama(cfg16).apply({"params": params16}, jnp.asarray(toks))
    assert out.dtype == jnp.bfloat16
    err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
    assert err <= BF16_BOUND * np.max(np.abs(ref)), err
    assert err > VISIBLE  # it really ran in bf16
    # The greedy choice agrees almost everywhere (ties within bf16 resolution may flip).
    assert np.mean(np.argmax(np.asarray(out, np.float32), -1) == np.argmax(ref, -1)) >= 0.9
