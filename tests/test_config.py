"""LlamaConfig / RopeConfig: reading and writing Hugging Face configs, validation, presets.

The reference is transformers itself: configs ringllama writes are loaded back by
transformers 5.x and must give the same rope settings (and the same inverse frequencies).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_fixtures import one_torch_thread  # noqa: F401  (module fixture)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import model
from model import ConfigError, LlamaConfig, RopeConfig

LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# One HF rope dict (v5 spelling, without rope_theta) per rope type, with every optional field exercised somewhere.
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "mscale": 1.0,
        "mscale_all_dim": 0.8,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "truncate": False,
    },
    "yarn_attention_factor": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
        "attention_factor": 1.25,
    },
    "llama3": LLAMA31_ROPE,
    "longrope": {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(32)],
        "long_factor": [1.0 + 0.9 * i for i in range(32)],
        "original_max_position_embeddings": 4096,
        "factor": 8.0,
    },
}
BASE_HF = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def v4_dict(rope: dict, theta: float = 500000.0, type_key: str = "rope_type") -> dict:
    """A transformers-v4 style config dict: top-level rope_theta plus rope_scaling."""
    scaling = None
    if rope["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_type"}
        scaling[type_key] = rope["rope_type"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **BASE_HF,
        "rope_theta": theta,
        "rope_scaling": scaling,
    }


def v5_dict(rope: dict, theta: float = 500000.0) -> dict:
    """A transformers-v5 style config dict: rope_parameters holding rope_theta."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **BASE_HF,
        "rope_parameters": {**rope, "rope_theta": theta},
    }


def hf_inv_freq(hf_config) -> tuple[np.ndarray, float]:
    """transformers' own inverse frequencies and attention scaling for a loaded config."""
    emb = LlamaRotaryEmbedding(hf_config)
    return emb.inv_freq.double().numpy(), float(emb.attention_scaling)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", list(ROPES))
def test_from_hf_reads_v4_and_v5_layouts_alike(name):
    rope = ROPES[name]
    v5 = LlamaConfig.from_hf(v5_dict(rope))
    assert v5 == LlamaConfig.from_hf(v4_dict(rope, type_key="rope_type"))
    assert v5 == LlamaConfig.from_hf(v4_dict(rope, type_key="type"))  # the oldest spelling
    assert v5.rope.rope_type == rope["rope_type"]
    assert v5.rope.theta == 500000.0
    for key, value in rope.items():
        if key != "rope_type":
            got = getattr(v5.rope, key)
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert (v5.num_heads, v5.num_kv_heads, v5.head_dim, v5.num_layers) == (4, 2, 64, 3)
    assert (v5.vocab_size, v5.hidden_size, v5.intermediate_size) == (1000, 256, 512)
    assert v5.eos_token_id == (2,) and v5.rms_norm_eps == 1e-5 and v5.max_position_embeddings == 32768


def test_from_hf_reads_a_directory_and_a_file_written_by_transformers(tmp_path):
    hf = transformers.LlamaConfig(**BASE_HF, rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    hf.save_pretrained(tmp_path)
    from_dir = LlamaConfig.from_hf(tmp_path)
    assert from_dir == LlamaConfig.from_hf(tmp_path / "config.json")
    assert from_dir == LlamaConfig.from_hf(v5_dict(LLAMA31_ROPE))


def test_from_hf_defaults_follow_transformers():
    """Absent fields take transformers' defaults: θ 10000, kv heads = heads, head_dim = hidden/heads,
    and the pretraining length of llama3/yarn/longrope falls back to max_position_embeddings."""
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1}
    hf |= {"num_attention_heads": 4, "max_position_embeddings": 1024}
    cfg = LlamaConfig.from_hf({**hf, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    ref = transformers.LlamaConfig(**hf, rope_parameters={"rope_type": "yarn", "factor": 2.0})
    assert cfg.rope.theta == ref.rope_parameters["rope_theta"] == 10000.0
    assert cfg.rope.original_max_position_embeddings == ref.rope_parameters["original_max_position_embeddings"]
    assert (cfg.num_kv_heads, cfg.head_dim) == (ref.num_key_value_heads, ref.head_dim) == (4, 16)
    # A top-level original_max_position_embeddings does not override it for Llama (as in transformers).
    top = transformers.LlamaConfig.from_dict(
        {**hf, "original_max_position_embeddings": 256, "rope_scaling": {"type": "yarn", "factor": 2.0}}
    )
    cfg_top = LlamaConfig.from_hf(
        {**hf, "original_max_position_embeddings": 256, "rope_scaling": {"type": "yarn", "factor": 2.0}}
    )
    assert cfg_top.rope.original_max_position_embeddings == top.rope_parameters["original_max_position_embeddings"]


def test_yarn_explicit_null_truncate_means_no_truncation_as_in_transformers():
    rope = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "truncate": None}
    cfg = LlamaConfig.from_hf(v5_dict(rope))
    assert cfg.rope.truncate is False
    inv, _ = model.inv_freq_and_scale(cfg.rope, 64, 32768)
    ref, _ = hf_inv_freq(transformers.LlamaConfig(**BASE_HF, rope_parameters={**rope, "rope_theta": 500000.0}))
    np.testing.assert_allclose(inv, ref, rtol=1e-6)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name", list(ROPES))
def test_to_hf_writes_both_layouts_consistently(name):
    cfg = LlamaConfig.from_hf(v5_dict(ROPES[name]))
    out = cfg.to_hf()
    params = out["rope_parameters"]
    assert params["rope_theta"] == out["rope_theta"] == cfg.rope.theta
    assert params["rope_type"] == cfg.rope.rope_type
    if cfg.rope.rope_type == "default":
        assert out["rope_scaling"] is None
    else:
        scaling = dict(out["rope_scaling"])
        assert scaling.pop("type") == scaling["rope_type"] == cfg.rope.rope_type
        assert {**scaling, "rope_theta": out["rope_theta"]} == params
    json.dumps(out)  # JSON-ready
    assert LlamaConfig.from_hf(out) == cfg


@pytest.mark.parametrize("layout", ["both", "v4_only", "v5_only"])
@pytest.mark.parametrize("name", list(ROPES))
def test_transformers_loads_to_hf_with_the_same_rope(tmp_path, name, layout):
    cfg = LlamaConfig.from_hf(v5_dict(ROPES[name]))
    out = cfg.to_hf()
    if layout == "v4_only":
        out.pop("rope_parameters")
    elif layout == "v5_only":
        out.pop("rope_scaling"), out.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(out))
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, transformers.LlamaConfig)
    expected = {k: v for k, v in cfg.rope.to_hf_dict().items()}
    got = {k: v for k, v in loaded.rope_parameters.items() if k != "type"}
    assert got == expected
    # Same numbers, not just the same dict: transformers' frequencies equal ringllama's.
    for seq_len in (None, 4096, 4097):
        ours, ours_scale = model.inv_freq_and_scale(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)
        if name == "longrope" and seq_len and seq_len > 4096:
            ref, ref_scale = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](loaded, None, seq_len)
            ref = ref.double().numpy()
        elif seq_len is None:
            ref, ref_scale = hf_inv_freq(loaded)
        else:
            continue
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        assert ours_scale == pytest.approx(ref_scale, rel=1e-6)
    # And the full round trip through transformers' own serialisation.
    loaded.save_pretrained(tmp_path / "again")
    assert LlamaConfig.from_hf(tmp_path / "again") == cfg


def test_dict_round_trip_keeps_ringllama_fields():
    cfg = model.preset("llama3.1-8b", dtype="bfloat16", scan_layers=False, remat_policy="dots", attention_impl="xla")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert LlamaConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="unknown model config field.*bogus"):
        LlamaConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ConfigError, match="unknown rope field.*scaling_factor"):
        LlamaConfig.from_dict({**data, "rope": {**data["rope"], "scaling_factor": 2}})


# The ringllama_config.json a checkpoint of the tiny preset holds, as written before the config library.
STORED_TINY = json.loads(
    '{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, '
    '"num_kv_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-05, "max_position_embeddings": 2048, '
    '"tie_word_embeddings": false, "rope": {"rope_type": "default", "theta": 10000.0, "factor": null, '
    '"low_freq_factor": null, "high_freq_factor": null, "original_max_position_embeddings": null, "beta_fast": null, '
    '"beta_slow": null, "mscale": null, "mscale_all_dim": null, "attention_factor": null, "truncate": null, '
    '"short_factor": null, "long_factor": null}, "bos_token_id": 1, "eos_token_id": [2], "dtype": "float32", '
    '"param_dtype": "float32", "scan_layers": true, "remat_policy": "none", "attention_impl": "auto", '
    '"attention_chunk": 512, "attention_kernel": "auto", "context_parallel": "auto", "ulysses_size": 0}'
)


def test_from_dict_reads_stored_checkpoint_configs():
    cfg = LlamaConfig.from_dict(STORED_TINY)
    assert cfg == model.preset("tiny") and hash(cfg) == hash(model.preset("tiny"))  # a jit static argument
    assert type(cfg) is LlamaConfig and type(cfg.rope) is RopeConfig and cfg.eos_token_id == (2,)
    assert cfg.to_dict() == STORED_TINY
    newer = ("attention_kernel", "context_parallel", "ulysses_size")
    older = {k: v for k, v in STORED_TINY.items() if k not in newer}  # before the fields existed
    assert LlamaConfig.from_dict(older) == cfg
    with pytest.raises(ConfigError, match=r"num_layers must be an int, got 'two'"):
        LlamaConfig.from_dict({**STORED_TINY, "num_layers": "two"})
    with pytest.raises(ConfigError, match=r"num_heads \(4\) must be divisible by num_kv_heads \(3\)"):
        LlamaConfig.from_dict({**STORED_TINY, "num_kv_heads": 3})  # __post_init__ checks run too


def test_replace_updates_single_rope_fields():
    cfg = model.preset("tiny").replace(rope=dict(theta=2.0e8), num_layers=3)
    assert cfg.rope.theta == 2.0e8 and cfg.rope.rope_type == "default" and cfg.num_layers == 3
    assert model.preset("tiny", rope=dict(theta=5.0)).rope.theta == 5.0


# ----------------------------------------------------------------------------- validation

_LLAMA = v5_dict(ROPES["default"])
BAD_HF = {
    "heads_not_divisible": (
        {**_LLAMA, "num_key_value_heads": 3},
        r"num_heads \(4\) must be divisible by num_kv_heads \(3\)",
    ),
    "unknown_rope_type": (
        {**_LLAMA, "rope_parameters": {"rope_type": "su", "rope_theta": 1e4}},
        r"unknown rope type 'su'",
    ),
    "unknown_rope_type_v4": (
        {**v4_dict(ROPES["linear"]), "rope_scaling": {"type": "ntk-by-parts", "factor": 2.0}},
        r"unknown rope type 'ntk-by-parts'",
    ),
    "llama3_missing_field": (
        v4_dict({k: v for k, v in LLAMA31_ROPE.items() if k != "low_freq_factor"}),
        r"rope type 'llama3' needs low_freq_factor",
    ),
    "linear_missing_factor": (v5_dict({"rope_type": "linear"}), r"rope type 'linear' needs factor"),
    "yarn_missing_factor": (v5_dict({"rope_type": "yarn"}), r"rope type 'yarn' needs factor"),
    "longrope_missing_long": (
        v5_dict({"rope_type": "longrope", "short_factor": [1.0] * 32}),
        r"rope type 'longrope' needs long_factor",
    ),
    "longrope_wrong_length": (
        v5_dict({**ROPES["longrope"], "long_factor": [1.0] * 31}),
        r"longrope long_factor has 31 entries but head_dim 64 needs 32",
    ),
    "llama3_band_order": (v5_dict({**LLAMA31_ROPE, "high_freq_factor": 1.0}), r"high_freq_factor > low_freq_factor"),
    "negative_factor": (v5_dict({"rope_type": "linear", "factor": -2.0}), r"rope factor must be positive"),
    "partial_rotary": (v5_dict({"rope_type": "default", "partial_rotary_factor": 0.5}), r"partial_rotary_factor 0.5"),
    "mistral": (
        {**_LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral"},
        r"unsupported architecture.*Mistral",
    ),
    "gemma_type": ({**_LLAMA, "architectures": None, "model_type": "gemma"}, r"unsupported architecture 'gemma'"),
    "llama_base_model": ({**_LLAMA, "architectures": ["LlamaModel"]}, r"LlamaForCausalLM checkpoints only"),
    "missing_hidden": ({k: v for k, v in _LLAMA.items() if k != "hidden_size"}, r"lacks 'hidden_size'"),
    "biases": ({**_LLAMA, "attention_bias": True}, r"biases"),
    "activation": ({**_LLAMA, "hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    "odd_head_dim": ({**_LLAMA, "head_dim": 63}, r"head_dim must be a positive even number"),
    "conflicting_layouts": (
        {**v4_dict(ROPES["linear"]), "rope_parameters": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5}},
        r"rope_scaling .* and rope_parameters .* disagree",
    ),
    "zero_layers": ({**_LLAMA, "num_hidden_layers": 0}, r"num_layers must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_configs_fail_with_one_clear_sentence(case):
    data, pattern = BAD_HF[case]
    with pytest.raises(ConfigError, match=pattern) as info:
        LlamaConfig.from_hf(data)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.json at .*: point at a Hugging Face model directory"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(ConfigError, match=r"config.json is not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(num_heads=6, num_kv_heads=4), r"num_heads \(6\) must be divisible by num_kv_heads \(4\)"),
        (dict(dtype="float64"), r"dtype 'float64' is not supported"),
        (dict(param_dtype="int8"), r"param_dtype 'int8' is not supported"),
        (dict(remat_policy="everything"), r"unknown remat_policy 'everything'"),
        (dict(attention_impl="flash3"), r"unknown attention_impl 'flash3'"),
        (dict(rms_norm_eps=0.0), r"rms_norm_eps must be positive"),
        (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer"),
        (dict(rope=dict(rope_type="yarn")), r"rope type 'yarn' needs factor, original_max_position_embeddings"),
        (dict(rope=dict(theta=0.0)), r"rope theta must be positive"),
    ],
)
def test_bad_llama_configs(kwargs, pattern):
    rope = kwargs.pop("rope", None)
    with pytest.raises(ConfigError, match=pattern):
        LlamaConfig(**kwargs, **({"rope": RopeConfig(**rope)} if rope else {}))


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'llama4-8b': use one of .*llama3-8b"):
        model.preset("llama4-8b")


# ----------------------------------------------------------------------------- presets

# Published parameter counts (HF safetensors index total_size / 2 bytes for the bf16 releases).
PUBLISHED = {
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.3-70b": 70_553_706_496,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_sizes_match_published_and_transformers(name):
    cfg = model.preset(name)
    assert cfg.num_params() == PUBLISHED[name]
    # transformers' own module for the same config, on the meta device (no memory).
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf()))
    assert sum(p.numel() for p in hf.parameters()) == PUBLISHED[name]
    assert cfg.vocab_size == 128256 and cfg.rms_norm_eps == 1e-5 and cfg.rope.theta == 500000.0


def test_preset_rope_and_context():
    assert model.preset("llama3-8b").rope.rope_type == "default"
    assert model.preset("llama3-8b").max_position_embeddings == 8192
    for name, factor in [("llama3.1-8b", 8.0), ("llama3.1-405b", 8.0), ("llama3.3-70b", 8.0), ("llama3.2-1b", 32.0)]:
        rope = model.preset(name).rope
        assert (rope.rope_type, rope.factor, rope.low_freq_factor, rope.high_freq_factor) == (
            "llama3",
            factor,
            1.0,
            4.0,
        )
        assert rope.original_max_position_embeddings == 8192
        assert model.preset(name).max_position_embeddings == 131072
    assert model.preset("llama3.2-1b").tie_word_embeddings and model.preset("llama3.2-1b").head_dim == 64
    assert not model.preset("llama3.1-70b").tie_word_embeddings


@pytest.mark.parametrize("name", ["tiny", "small", "llama3.2-1b"])
def test_abstract_params_count_equals_formula(name):
    cfg = model.preset(name)
    assert model.count_params(model.abstract_params(cfg)) == cfg.num_params()
