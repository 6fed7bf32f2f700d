"""RoPE: frequencies against transformers for every rope type, angle precision, rotation, θ rules.

References: ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` and
``LlamaRotaryEmbedding`` (frequencies, attention factor, the per-forward dynamic and
longrope updates) and float64 numpy (angles).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import one_torch_thread  # noqa: F401  (module fixture)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from model import RopeConfig, apply_rope, inv_freq_and_scale, rope_angles, rope_cos_sin, theta_for_length
from model.rope import default_inv_freq

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _factors(n: int, lo: float, hi: float) -> list[float]:
    return [float(x) for x in np.linspace(lo, hi, n)]


# name: (head_dim, max_position_embeddings, theta, HF rope dict without rope_theta, seq_lens to check)
CASES = {
    "default_d128": (128, 8192, 500000.0, {"rope_type": "default"}, [None]),
    "default_d64_theta_huge": (64, 8192, 4.52e10, {"rope_type": "default"}, [None]),
    "linear": (128, 16384, 500000.0, {"rope_type": "linear", "factor": 4.0}, [None]),
    "dynamic": (128, 4096, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, [None, 100, 4096, 4097, 10000, 250000]),
    "dynamic_d64": (64, 2048, 500000.0, {"rope_type": "dynamic", "factor": 8.0}, [None, 3000, 65536]),
    "llama3.1": (
        128,
        131072,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        [None],
    ),
    "llama3.2_d64": (
        64,
        131072,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        [None],
    ),
    "yarn": (
        128,
        32768,
        10000.0,
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
        [None],
    ),
    "yarn_mscale": (
        128,
        163840,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        [None],
    ),
    "yarn_mscale_equal": (
        64,
        163840,
        10000.0,
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        [None],
    ),
    "yarn_attention_factor": (
        128,
        32768,
        1000000.0,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "attention_factor": 0.9},
        [None],
    ),
    "yarn_no_truncate": (
        128,
        131072,
        150000.0,
        {
            "rope_type": "yarn",
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
        [None],
    ),
    "yarn_betas": (
        96,
        65536,
        500000.0,
        {
            "rope_type": "yarn",
            "factor": 16.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 8.0,
            "beta_slow": 2.0,
        },
        [None],
    ),
    "longrope": (
        96,
        131072,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": _factors(48, 1.0, 1.2),
            "long_factor": _factors(48, 1.0, 40.0),
            "original_max_position_embeddings": 4096,
        },
        [None, 1000, 4096, 4097, 131072],
    ),
    "longrope_factor_and_attention": (
        128,
        131072,
        10000.0,
        {
            "rope_type": "longrope",
            "short_factor": _factors(64, 1.0, 1.1),
            "long_factor": _factors(64, 2.0, 20.0),
            "original_max_position_embeddings": 8192,
            "factor": 8.0,
            "attention_factor": 1.1,
        },
        [None, 8192, 8193],
    ),
}


def hf_config(head_dim: int, max_pos: int, theta: float, rope: dict) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={**rope, "rope_theta": theta},
    )


def ours(rope: dict, theta: float) -> RopeConfig:
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in rope.items() if k != "rope_type"}
    return RopeConfig(rope_type=rope["rope_type"], theta=theta, **kwargs)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b) / np.abs(b)))


@pytest.mark.parametrize("name", list(CASES))
def test_inv_freq_and_attention_factor_match_transformers(name):
    head_dim, max_pos, theta, rope, seq_lens = CASES[name]
    cfg = hf_config(head_dim, max_pos, theta, rope)
    rope_cfg = ours(rope, theta)
    for seq_len in seq_lens:
        if rope["rope_type"] == "default":
            ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
        else:
            ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, None, seq_len)
        ref = ref.double().numpy()
        inv, scale = inv_freq_and_scale(rope_cfg, head_dim, max_pos, seq_len)
        assert inv.shape == (head_dim // 2,) and inv.dtype == np.float64
        assert rel_diff(inv, ref) <= 1e-6, (seq_len, rel_diff(inv, ref))
        assert abs(scale - ref_scale) <= 1e-6 * abs(ref_scale), (seq_len, scale, ref_scale)


def test_cases_exercise_every_branch():
    """The table above is only a test if it reaches the behaviours it claims to."""
    # yarn: the attention factor differs between the plain, mscale, equal-mscale and explicit variants.
    scales = {
        n: inv_freq_and_scale(ours(CASES[n][3], CASES[n][2]), CASES[n][0], CASES[n][1])[1] for n in CASES if "yarn" in n
    }
    assert scales["yarn"] == pytest.approx(0.1 * math.log(8) + 1)
    assert scales["yarn_mscale"] == pytest.approx((0.1 * math.log(40) + 1) / (0.08 * math.log(40) + 1))
    assert scales["yarn_mscale_equal"] == pytest.approx(1.0)
    assert scales["yarn_attention_factor"] == 0.9
    # truncate=False moves the ramp: different frequencies from the truncated default.
    _, max_pos, theta, rope, _ = CASES["yarn_no_truncate"]
    truncated = inv_freq_and_scale(ours({**rope, "truncate": True}, theta), 128, max_pos)[0]
    assert rel_diff(inv_freq_and_scale(ours(rope, theta), 128, max_pos)[0], truncated) > 1e-3
    # longrope switches at original_max_position_embeddings (seq_len 4096 short, 4097 long).
    head_dim, max_pos, theta, rope, _ = CASES["longrope"]
    cfg = ours(rope, theta)
    short = inv_freq_and_scale(cfg, head_dim, max_pos, 4096)[0]
    long = inv_freq_and_scale(cfg, head_dim, max_pos, 4097)[0]
    np.testing.assert_allclose(short, default_inv_freq(theta, head_dim) / np.array(rope["short_factor"]), rtol=1e-12)
    np.testing.assert_allclose(long, default_inv_freq(theta, head_dim) / np.array(rope["long_factor"]), rtol=1e-12)
    assert inv_freq_and_scale(cfg, head_dim, max_pos)[1] == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    # dynamic grows θ only past max_position_embeddings.
    head_dim, max_pos, theta, rope, _ = CASES["dynamic"]
    cfg = ours(rope, theta)
    at_max = inv_freq_and_scale(cfg, head_dim, max_pos, max_pos)[0]
    np.testing.assert_allclose(at_max, default_inv_freq(theta, head_dim), rtol=1e-12)
    assert inv_freq_and_scale(cfg, head_dim, max_pos, 4 * max_pos)[0][-1] < at_max[-1] / 2


# ----------------------------------------------------------------------------- in-model cos/sin


def _hf_cos_sin(cfg: transformers.LlamaConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cos/sin for one forward (a fresh module: dynamic rope keeps state across calls)."""
    emb = LlamaRotaryEmbedding(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = emb(x, torch.as_tensor(positions, dtype=torch.long))
    half = cfg.head_dim // 2
    return cos.double().numpy()[..., :half], sin.double().numpy()[..., :half]


@pytest.mark.parametrize(
    ("name", "rope", "lengths"),
    [
        ("dynamic", {"rope_type": "dynamic", "factor": 4.0}, [20, 64, 65, 150]),
        (
            "longrope",
            {
                "rope_type": "longrope",
                "short_factor": _factors(16, 1.0, 1.5),
                "long_factor": _factors(16, 1.0, 9.0),
                "original_max_position_embeddings": 64,
            },
            [20, 64, 65, 150],
        ),
        ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, [150]),
        ("llama3", CASES["llama3.1"][3] | {"original_max_position_embeddings": 64}, [150]),
    ],
)
def test_rope_cos_sin_follows_transformers_forward(name, rope, lengths):
    """The traced path: dynamic θ and the longrope switch come from the largest position, as in HF."""
    head_dim, max_pos, theta = 32, 64, 10000.0
    cfg = hf_config(head_dim, max_pos, theta, rope)
    fn = jax.jit(lambda p: rope_cos_sin(p, ours(rope, theta), head_dim, max_pos))
    for length in lengths:
        # Two rows; the largest position decides for the whole batch (HF: torch.max(position_ids)).
        positions = np.stack([np.arange(length), np.arange(length) // 2]).astype(np.int32)
        cos, sin = (np.asarray(a, np.float64) for a in fn(jnp.asarray(positions)))
        ref_cos, ref_sin = _hf_cos_sin(cfg, positions)
        # HF's fp32 `pos * inv_freq` is itself off by up to pos·2^-24 rad (≈1e-5 at 150).
        np.testing.assert_allclose(cos, ref_cos, atol=2e-5, err_msg=f"{name} length {length}")
        np.testing.assert_allclose(sin, ref_sin, atol=2e-5, err_msg=f"{name} length {length}")


# ----------------------------------------------------------------------------- angle precision

THETA_1M = 4.52e10  # θ for a multi-million-token context
MAX_POS = 4_194_303


def _extreme_positions() -> np.ndarray:
    rng = np.random.default_rng(0)
    powers = 2 ** np.arange(23)
    positions = np.unique(
        np.concatenate(
            [
                np.arange(MAX_POS - 8191, MAX_POS + 1),  # the far end, where fp32 is worst
                rng.integers(0, MAX_POS + 1, 40_000),
                powers,
                powers - 1,
                np.arange(4096 * 1000 - 5, 4096 * 1000 + 5),  # 12-bit digit carries
                np.arange(4096 - 3, 4096 + 3),
                np.arange(0, 100),
            ]
        )
    )
    return positions[positions <= MAX_POS].astype(np.int32)


def _wrapped_error(angles: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> float:
    exact = positions.astype(np.float64)[:, None] * inv_freq[None, :]  # float64: error ~1e-9 rad here
    diff = np.asarray(angles, np.float64) - exact
    return float(np.max(np.abs(np.mod(diff + np.pi, 2 * np.pi) - np.pi)))


@pytest.mark.parametrize(
    "inv_freq",
    [
        default_inv_freq(THETA_1M, 128),
        inv_freq_and_scale(
            RopeConfig(
                rope_type="llama3",
                theta=THETA_1M,
                **{k: v for k, v in CASES["llama3.1"][3].items() if k != "rope_type"},
            ),
            128,
            131072,
        )[0],
    ],
    ids=["default", "llama3"],
)
def test_rope_angles_are_accurate_at_four_million_positions(inv_freq):
    positions = _extreme_positions()
    assert positions.max() == MAX_POS
    angles = jax.jit(lambda p: rope_angles(p, inv_freq))(jnp.asarray(positions))
    assert angles.dtype == jnp.float32
    err = _wrapped_error(np.asarray(angles), positions, inv_freq)
    naive = positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    naive_err = _wrapped_error(naive, positions, inv_freq)
    assert err <= 1e-4, err
    assert naive_err > 100 * err, (naive_err, err)  # measured: ~1e-6 vs ~0.13 rad


# ----------------------------------------------------------------------------- rotation


def _numpy_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, scale: float) -> np.ndarray:
    """float64 half-split RoPE, written out from the definition."""
    ang = positions.astype(np.float64)[..., None] * inv_freq  # [b, t, h/2]
    cos, sin = np.cos(ang)[:, :, None, :] * scale, np.sin(ang)[:, :, None, :] * scale
    x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_apply_rope_matches_numpy_at_explicit_global_positions():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 32)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [1_000_000, 7, 123_456, 3_000_000, 42]], np.int32)
    rope = RopeConfig(rope_type="yarn", theta=1e6, factor=4.0, original_max_position_embeddings=4096)
    out = np.asarray(jax.jit(lambda a, p: apply_rope(a, p, rope, 16384))(x, positions))
    inv, scale = inv_freq_and_scale(rope, 32, 16384)
    np.testing.assert_allclose(out, _numpy_rope(x, positions, inv, scale), atol=5e-6)


def test_rope_scores_depend_only_on_relative_position():
    """q·k after RoPE is a function of (m − n): a sequence shard at a global offset sees the same scores."""
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 4, 2, 64)).astype(np.float32)
    k = rng.standard_normal((1, 4, 2, 64)).astype(np.float32)
    rope = RopeConfig(theta=500000.0)
    near = np.array([[0, 5, 9, 13]], np.int32)

    def scores(offset):
        qr = apply_rope(jnp.asarray(q), jnp.asarray(near + offset), rope)
        kr = apply_rope(jnp.asarray(k), jnp.asarray(near + offset), rope)
        return np.asarray(jnp.einsum("btnh,bsnh->bnts", qr, kr))

    base = scores(0)
    for offset in (1, 4096, 1_048_576, 3_000_000):
        np.testing.assert_allclose(scores(offset), base, atol=2e-4, rtol=0)


# ----------------------------------------------------------------------------- θ rules


def test_theta_for_length_critical_reproduces_gradient_configs():
    assert theta_for_length(262_144, 500000.0, 8192, 128, "critical") == pytest.approx(2.835e8, rel=1e-3)
    assert theta_for_length(1_048_576, 500000.0, 8192, 128, "critical") == pytest.approx(3.580e9, rel=1e-3)
    assert theta_for_length(8192, 500000.0, 8192, 128, "critical") == pytest.approx(500000.0, rel=1e-12)
    # Definition: the critical dimension's wavelength at L' equals L'.
    for target in (65_536, 524_288, 4_194_304):
        theta = theta_for_length(target, 500000.0, 8192, 128, "critical")
        assert math.log(theta) / math.log(target / (2 * math.pi)) == pytest.approx(
            math.log(500000.0) / math.log(8192 / (2 * math.pi)), rel=1e-12
        )


def test_theta_for_length_ntk():
    assert theta_for_length(1_048_576, 500000.0, 8192, 128, "ntk") == pytest.approx(
        500000.0 * 128 ** (128 / 126), rel=1e-12
    )
    assert theta_for_length(1_048_576, 500000.0, 8192, 128, "ntk") == pytest.approx(6.9e7, rel=1e-2)
    assert theta_for_length(8192, 500000.0, 8192, 128, "ntk") == 500000.0
    assert theta_for_length(32768, 10000.0, 2048, 64, "ntk") == pytest.approx(10000.0 * 16 ** (64 / 62), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((1000, 500000.0, 8192, 128, "yarn"), "unknown θ rule 'yarn'"),
        ((0, 500000.0, 8192, 128, "ntk"), "positive lengths"),
    ],
)
def test_theta_for_length_rejects_bad_input(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        theta_for_length(*args)
