"""Rotary position embeddings: the settings, one table of rope types, precise angles, rotation.

`ROPE_TYPES` is the one place a rope type is defined: name → `RopeType` (its frequency function,
the `RopeConfig` fields it cannot do without, an optional extra check, and, for types whose
frequencies follow the traced sequence length, its own cos/sin). A new type is its frequency
function plus one row; `RopeConfig` validation and HF config reading follow the row.

Layout is HF's half-split (``rotate_half``): for ``x = [x1, x2]`` along head_dim,
``out = [x1·cos − x2·sin, x2·cos + x1·sin]``, so HF q/k weights load with a transpose only.

Frequencies are computed on the host in float64 from the (static) config. Angles are the
delicate part: ``pos · inv_freq`` in fp32 loses ~1e-1 rad at positions near 4M because the
product is ~1e6 rad and fp32 keeps only 24 bits. `rope_angles` instead splits the int32
position into 12-bit digits, multiplies each digit by a 12-significant-bit constant (an
exact fp32 product), reduces each exact product modulo 2π with a three-part 2π
(Cody–Waite), and only then adds — errors stay around 1e-6 rad for any int32 position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model.schema import ConfigError, Items


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; every field of every HF rope type (unused ones stay None)."""

    rope_type: str = "default"
    """a key of `ROPE_TYPES`: default | linear | dynamic | yarn | llama3 | longrope (HF's rope types)"""
    theta: float = 500000.0
    """the rotary base θ"""
    factor: float | None = None
    """context scaling factor (linear, dynamic, yarn, llama3, longrope)"""
    low_freq_factor: float | None = None
    """llama3: wavelengths above original/low_freq_factor are divided by factor"""
    high_freq_factor: float | None = None
    """llama3: wavelengths below original/high_freq_factor stay unchanged"""
    original_max_position_embeddings: int | None = None
    """the pretraining context length (llama3, yarn, longrope)"""
    beta_fast: float | None = None
    """yarn: fast boundary of the correction range (HF default 32)"""
    beta_slow: float | None = None
    """yarn: slow boundary of the correction range (HF default 1)"""
    mscale: float | None = None
    """yarn: attention-factor scale"""
    mscale_all_dim: float | None = None
    """yarn: attention-factor scale divided out over all dims"""
    attention_factor: float | None = None
    """yarn/longrope: explicit attention factor on cos and sin"""
    truncate: bool | None = None
    """yarn: floor/ceil the correction range (HF default true)"""
    short_factor: Items[float] | None = None
    """longrope: per-frequency factors within the original context (head_dim/2 entries)"""
    long_factor: Items[float] | None = None
    """longrope: per-frequency factors beyond the original context (head_dim/2 entries)"""

    def __post_init__(self) -> None:
        kind = ROPE_TYPES.get(self.rope_type)
        if kind is None:
            raise ConfigError(f"unknown rope type {self.rope_type!r}: use one of {', '.join(ROPE_TYPES)}.")
        missing = [f for f in kind.required if getattr(self, f) is None]
        if missing:
            raise ConfigError(
                f"rope type {self.rope_type!r} needs {', '.join(missing)}: add them to the rope settings."
            )
        if not self.theta > 0:
            raise ConfigError(f"rope theta must be positive, got {self.theta}.")
        if self.factor is not None and not self.factor > 0:
            raise ConfigError(f"rope factor must be positive, got {self.factor}.")
        problem = kind.check(self) if kind.check else None
        if problem:
            raise ConfigError(problem)
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def from_hf_dict(cls, rope: dict[str, Any] | None, theta: float | None) -> RopeConfig:
        """Build from an HF ``rope_scaling`` / ``rope_parameters`` dict and a theta."""
        rope = dict(rope or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta", theta)
        partial = rope.get("partial_rotary_factor")
        if partial is not None and float(partial) != 1.0:
            raise ConfigError(
                f"partial_rotary_factor {partial} is not supported: ringllama rotates the whole head (use 1.0)."
            )
        kwargs = {k: rope[k] for k in _ROPE_KEYS if rope.get(k) is not None}
        if "truncate" in rope and rope["truncate"] is None:
            kwargs["truncate"] = False  # transformers reads an explicit null as "do not truncate"
        return cls(rope_type=rope_type, theta=float(theta if theta is not None else 10000.0), **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF v5 ``rope_parameters`` dict (v4's ``rope_scaling`` is this minus ``rope_theta``)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for k in _ROPE_KEYS:
            v = getattr(self, k)
            if v is not None:
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


# HF rope-dict keys: every RopeConfig field but the two that HF names differently (rope_type, rope_theta).
_ROPE_KEYS = tuple(f.name for f in dataclasses.fields(RopeConfig) if f.name not in ("rope_type", "theta"))


@dataclass(frozen=True)
class RopeType:
    """One row of `ROPE_TYPES`."""

    frequencies: Callable[[RopeConfig, int, int, int | None], tuple[np.ndarray, float]]
    """``(rope, head_dim, max_position_embeddings, seq_len) -> (inv_freq [head_dim/2] float64, attention factor)``"""
    required: tuple[str, ...] = ()
    """`RopeConfig` fields the type cannot do without (the rest take HF's defaults)"""
    check: Callable[[RopeConfig], str | None] | None = None
    """a further check of the settings: the error sentence, or None when they are fine"""
    cos_sin: Callable[[jax.Array, RopeConfig, int, int], tuple[jax.Array, jax.Array]] | None = None
    """``(positions, rope, head_dim, max_pos) -> (cos, sin)`` for frequencies that follow the traced length"""


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """``inv_freq[i] = θ^(−2i/d)`` for ``i < d/2``, float64."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def dynamic_theta(rope: RopeConfig, head_dim: int, seq_len, max_position_embeddings: int):
    """NTK-dynamic θ' = θ·((f·L/M) − (f−1))^(d/(d−2)) with L = max(seq_len, M); works on jnp scalars."""
    length = (
        jnp.maximum(seq_len, max_position_embeddings)
        if not isinstance(seq_len, int)
        else max(seq_len, max_position_embeddings)
    )
    f = rope.factor
    return rope.theta * ((f * length / max_position_embeddings) - (f - 1)) ** (head_dim / (head_dim - 2))


def inv_freq_and_scale(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[np.ndarray, float]:
    """Inverse frequencies ``[head_dim/2]`` (float64) and the attention factor for a rope config.

    ``seq_len`` matters for ``dynamic`` (θ grows past ``max_position_embeddings``) and for
    ``longrope`` (long factors once the sequence exceeds the pretraining length); like HF,
    it is the largest position + 1.
    """
    return ROPE_TYPES[rope.rope_type].frequencies(rope, head_dim, max_position_embeddings, seq_len)


def _default(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    return default_inv_freq(rope.theta, d), 1.0


def _linear(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    return default_inv_freq(rope.theta, d) / rope.factor, 1.0


def _dynamic(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    theta = dynamic_theta(rope, d, int(seq_len or max_pos), max_pos)
    return default_inv_freq(float(theta), d), 1.0


def _longrope(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Per-frequency factors: short ones up to the pretraining length, long ones beyond it."""
    base = default_inv_freq(rope.theta, d)
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_pos / orig
    scale = rope.attention_factor
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    use_long = seq_len is not None and seq_len > orig
    ext = np.asarray(rope.long_factor if use_long else rope.short_factor, dtype=np.float64)
    if ext.shape != base.shape:
        raise ValueError(f"longrope factors need {base.shape[0]} entries (head_dim/2), got {ext.shape[0]}.")
    return base / ext, float(scale)


def _llama3(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between.

    The blend weight is ill-conditioned (``orig/wavelen − low`` cancels): an input error δ
    moves the medium frequencies by up to δ·(factor−1)/(high−low). transformers computes it
    in fp32, so it is computed here in fp32 the same way (float64 weights would differ from
    transformers by up to ~5e-6 relative); the frequencies themselves stay float64. What is
    left is torch's own fp32 ``pow`` rounding (≤ 1e-6 relative for Llama 3.1/3.2 settings,
    up to ~3e-6 for factor 32 with high − low = 1).
    """
    base = default_inv_freq(rope.theta, d)
    orig, factor = rope.original_max_position_embeddings, rope.factor
    low, high = rope.low_freq_factor, rope.high_freq_factor
    # transformers' own fp32 frequencies (fp32 exponent, fp32 power) feed its blend weights.
    exponent32 = np.arange(0, 2 * base.shape[0], 2, dtype=np.float32) / np.float32(2 * base.shape[0])
    inv32 = np.float32(1) / (np.float32(rope.theta) ** exponent32)
    wavelen32 = np.float32(2 * math.pi) / inv32
    smooth = ((np.float32(orig) / wavelen32 - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    keep = (np.float32(1) - smooth).astype(np.float64)
    smoothed = keep * base / factor + smooth.astype(np.float64) * base
    scaled = np.where(wavelen32 > np.float32(orig / low), base / factor, base)
    medium = ~(wavelen32 < np.float32(orig / high)) & ~(wavelen32 > np.float32(orig / low))
    return np.where(medium, smoothed, scaled), 1.0


def _llama3_check(rope: RopeConfig) -> str | None:
    if rope.high_freq_factor > rope.low_freq_factor:
        return None
    return (
        f"llama3 rope needs high_freq_factor > low_freq_factor, got {rope.high_freq_factor} and "
        f"{rope.low_freq_factor}: Llama 3.1 uses 4.0 and 1.0."
    )


def _yarn(rope: RopeConfig, d: int, max_pos: int, seq_len: int | None) -> tuple[np.ndarray, float]:
    """YaRN: ramp from extrapolated to interpolated frequencies across the correction range."""
    base = default_inv_freq(rope.theta, d)
    factor, orig, theta = rope.factor, rope.original_max_position_embeddings, rope.theta

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scale = rope.attention_factor
    if scale is None:
        if rope.mscale and rope.mscale_all_dim:
            scale = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            scale = mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (d * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    # The ramp weights in fp32 as transformers computes them (1 − ramp cancels; see `_llama3`).
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolate = (np.float32(1) - ramp).astype(np.float32)
    interpolate = (np.float32(1) - extrapolate).astype(np.float64)
    inv = (base / factor) * interpolate + base * extrapolate.astype(np.float64)
    return inv, float(scale)


def _dynamic_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int, max_pos: int):
    # θ depends on a traced length, so the frequencies are built in-graph (fp32 angles).
    seq_len = jnp.max(positions).astype(jnp.float32) + 1.0
    theta = dynamic_theta(rope, head_dim, seq_len, max_pos)
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv = 1.0 / (theta**exponents)
    ang = jnp.einsum("...,f->...f", positions.astype(jnp.float32), inv, precision=jax.lax.Precision.HIGHEST)
    return jnp.cos(ang), jnp.sin(ang)


def _longrope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int, max_pos: int):
    # Both frequency sets are host constants; the traced largest position picks one.
    short, scale = _longrope(rope, head_dim, max_pos, None)
    long, _ = _longrope(rope, head_dim, max_pos, 1 << 62)
    use_long = jnp.max(positions) + 1 > rope.original_max_position_embeddings
    ang = jnp.where(use_long, rope_angles(positions, long), rope_angles(positions, short))
    return jnp.cos(ang) * scale, jnp.sin(ang) * scale


_ORIG = "original_max_position_embeddings"
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(_default),
    "linear": RopeType(_linear, ("factor",)),
    "dynamic": RopeType(_dynamic, ("factor",), cos_sin=_dynamic_cos_sin),
    "yarn": RopeType(_yarn, ("factor", _ORIG)),
    "llama3": RopeType(_llama3, ("factor", "low_freq_factor", "high_freq_factor", _ORIG), check=_llama3_check),
    "longrope": RopeType(_longrope, ("short_factor", "long_factor", _ORIG), cos_sin=_longrope_cos_sin),
}


_DIGIT_BITS = 12
_NUM_DIGITS = 3  # 36 bits cover every non-negative int32 position


def _split_bits(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Split float64 ``x`` into ``hi`` with ``bits`` significant bits and the float64 rest."""
    mant, expo = np.frexp(x)
    hi = np.ldexp(np.round(np.ldexp(mant, bits)), expo - bits)
    return hi, x - hi


# 2π as three pieces of 11 significant bits each: k·piece is exact in fp32 for k < 2^13.
_TWO_PI_1, _rest = _split_bits(np.float64(2 * math.pi), 11)
_TWO_PI_2, _rest = _split_bits(_rest, 11)
_TWO_PI_3 = _rest


def _reduce_exact(x: jax.Array) -> jax.Array:
    """``x mod 2π`` into about [−π, π] for an fp32 ``x`` that is exact and below ~5e4."""
    turns = jnp.round(x * (1.0 / (2 * math.pi)))
    return ((x - turns * _TWO_PI_1.astype(np.float32)) - turns * _TWO_PI_2.astype(np.float32)) - turns * np.float32(
        _TWO_PI_3
    )


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotation angles ``[..., d/2]`` in fp32, reduced modulo 2π, accurate for any int32 position.

    Args:
        positions: int ``[...]`` (non-negative).
        inv_freq: float64 ``[d/2]`` (host constants).

    Returns:
        fp32 ``[..., d/2]`` equal to ``positions · inv_freq`` modulo 2π.
    """
    pos = positions.astype(jnp.int32)[..., None]
    mask = (1 << _DIGIT_BITS) - 1
    angle = jnp.zeros(pos.shape[:-1] + inv_freq.shape, jnp.float32)
    small = jnp.zeros_like(angle)
    for j in range(_NUM_DIGITS):
        digit = ((pos >> (_DIGIT_BITS * j)) & mask).astype(jnp.float32)
        # Digit j contributes digit · (2^(12j)·inv mod 2π); the constant is reduced on the host.
        const = np.mod(np.ldexp(inv_freq, _DIGIT_BITS * j), 2 * math.pi) if j else inv_freq
        hi, lo = _split_bits(const, _DIGIT_BITS)
        angle = angle + _reduce_exact(digit * hi.astype(np.float32))  # exact product: 12 × 12 bits
        small = small + digit * lo.astype(np.float32)
    return angle + small


def rope_cos_sin(
    positions: jax.Array, rope: RopeConfig, head_dim: int, max_position_embeddings: int
) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[batch, seq, head_dim/2]`` (fp32, attention factor applied).

    ``dynamic`` and ``longrope`` depend on the largest position in ``positions``, as in HF.
    ``dynamic`` builds its θ in-graph, so its angles are plain fp32 ``pos · inv_freq`` (off by
    up to ~pos·2⁻²⁴ rad, as in transformers); every other type gets `rope_angles`' precision.
    """
    own = ROPE_TYPES[rope.rope_type].cos_sin
    if own is not None:
        return own(positions, rope, head_dim, max_position_embeddings)
    inv, scale = inv_freq_and_scale(rope, head_dim, max_position_embeddings)
    ang = rope_angles(positions, inv)
    return jnp.cos(ang) * scale, jnp.sin(ang) * scale


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` by ``cos/sin [batch, seq, head_dim/2]`` (half-split)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos_bt1h, sin_bt1h = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    return jnp.concatenate([x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1).astype(x.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, rope: RopeConfig | None = None, max_position_embeddings: int = 8192
) -> jax.Array:
    """Apply RoPE to ``x [batch, seq, heads, head_dim]`` at explicit int32 ``positions [batch, seq]``.

    Positions are global token indices, so a sequence shard passes its own slice of them.
    """
    rope = rope or RopeConfig()
    cos, sin = rope_cos_sin(positions, rope, x.shape[-1], max_position_embeddings)
    return rotate(x, cos, sin)


def theta_for_length(
    target_len: int, base_theta: float = 500000.0, base_len: int = 8192, head_dim: int = 128, rule: str = "critical"
) -> float:
    """θ for a new context length.

    ``critical`` keeps the critical dimension fixed: θ' = (L'/2π)^(ln θ₀ / ln(L₀/2π))
    (2.835e8 at 262,144 and 3.580e9 at 1,048,576 from θ₀ = 500000, L₀ = 8192).
    ``ntk`` is the NTK-aware rule θ' = θ₀·(L'/L₀)^(d/(d−2)).
    """
    if target_len <= 0 or base_len <= 0 or base_theta <= 1:
        raise ValueError("theta_for_length needs positive lengths and a base θ above 1.")
    if rule == "critical":
        return float((target_len / (2 * math.pi)) ** (math.log(base_theta) / math.log(base_len / (2 * math.pi))))
    if rule == "ntk":
        return float(base_theta * (target_len / base_len) ** (head_dim / (head_dim - 2)))
    raise ValueError(f"unknown θ rule {rule!r}: use 'critical' or 'ntk'.")
