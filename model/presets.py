"""Named model presets: the Llama 3.x family and small shapes for tests and the demo."""

from __future__ import annotations

from model.config import ConfigError, LlamaConfig, RopeConfig

_LLAMA31_ROPE = RopeConfig(
    rope_type="llama3",
    theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
_LLAMA32_ROPE = RopeConfig(
    rope_type="llama3",
    theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
_EOS_31 = (128001, 128008, 128009)


def _llama(hidden, mlp, heads, layers, head_dim=128, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_heads=heads,
        num_kv_heads=8,
        num_layers=layers,
        head_dim=head_dim,
        **kw,
    )


PRESETS: dict[str, LlamaConfig] = {
    "llama3-8b": _llama(4096, 14336, 32, 32),
    "llama3-70b": _llama(8192, 28672, 64, 80),
    "llama3.1-8b": _llama(
        4096, 14336, 32, 32, rope=_LLAMA31_ROPE, max_position_embeddings=131072, eos_token_id=_EOS_31
    ),
    "llama3.1-70b": _llama(
        8192, 28672, 64, 80, rope=_LLAMA31_ROPE, max_position_embeddings=131072, eos_token_id=_EOS_31
    ),
    "llama3.1-405b": _llama(
        16384, 53248, 128, 126, rope=_LLAMA31_ROPE, max_position_embeddings=131072, eos_token_id=_EOS_31
    ),
    "llama3.2-1b": _llama(
        2048,
        8192,
        32,
        16,
        head_dim=64,
        rope=_LLAMA32_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        eos_token_id=_EOS_31,
    ),
    "llama3.2-3b": _llama(
        3072,
        8192,
        24,
        28,
        rope=_LLAMA32_ROPE,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        eos_token_id=_EOS_31,
    ),
    "llama3.3-70b": _llama(
        8192, 28672, 64, 80, rope=_LLAMA31_ROPE, max_position_embeddings=131072, eos_token_id=_EOS_31
    ),
    # Small shapes: byte-level vocab, a few layers; for tests, the demo and CPU benchmarks.
    "tiny": LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        rope=RopeConfig(theta=10000.0),
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    # Between tiny and small: wide enough heads (32) for a retrieval circuit to form within a few
    # hundred CPU steps; the demo's shape.
    "mini": LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        rope=RopeConfig(theta=10000.0),
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    "small": LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope=RopeConfig(theta=10000.0),
        bos_token_id=1,
        eos_token_id=(2,),
    ),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """The named preset with field overrides (``rope=dict(theta=...)`` updates rope fields)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
