"""ringllama's Llama 3: config, presets, RoPE, the Flax model, KV cache, generation and the chunked LM loss.

Shape letters: the legend in `attention` (b t s d n k h f v here).

    cfg = model.preset("tiny")                          # or LlamaConfig.from_hf(dir)
    params = model.init_params(cfg, jax.random.key(0))
    logits = model.Llama(cfg).apply({"params": params}, tokens)   # tokens[b, t] -> [b, t, v]
    out = model.generate(cfg, params, prompt, max_new_tokens=32)  # prompt[b, t] -> [b, t + new]
    loss_sum, count = model.chunked_cross_entropy(hidden, head, targets, mask, chunk=1024)  # hidden[b, t, d]

On a mesh the caller installs the logical-axis rules around whatever traces the model (the model
never imports `sharding`; given a mesh without rules it raises `attention.RulesError`)::

    with sharding.axis_rules(mesh):
        logits = model.Llama(cfg, mesh=mesh).apply({"params": params}, tokens)

Numerics (checked in tests/test_parity.py against transformers): fp32 logits agree to
max |Δ| ≤ 1e-4 for every rope type; ``dtype="bfloat16"`` compute (fp32 or bf16 params)
stays within 2⁻⁶·max|logit| of the fp32 logits on the test models.
"""

from model.cache import init_cache
from model.config import ATTENTION_IMPLS, ConfigError, LlamaConfig
from model.generate import generate
from model.llama import Llama
from model.lora import LoraConfig
from model.loss import chunked_cross_entropy, chunked_token_nll
from model.params import abstract_params, boxed_init_fn, count_params, init_params, lm_head_kernel, logical_axes
from model.presets import PRESETS, preset
from model.rope import (
    ROPE_TYPES,
    RopeConfig,
    RopeType,
    apply_rope,
    inv_freq_and_scale,
    rope_angles,
    rope_cos_sin,
    rotate,
    theta_for_length,
)

__all__ = [
    "ATTENTION_IMPLS",
    "PRESETS",
    "ROPE_TYPES",
    "ConfigError",
    "Llama",
    "LlamaConfig",
    "LoraConfig",
    "RopeConfig",
    "RopeType",
    "abstract_params",
    "boxed_init_fn",
    "apply_rope",
    "chunked_cross_entropy",
    "chunked_token_nll",
    "count_params",
    "generate",
    "init_cache",
    "init_params",
    "inv_freq_and_scale",
    "lm_head_kernel",
    "logical_axes",
    "preset",
    "rope_angles",
    "rope_cos_sin",
    "rotate",
    "theta_for_length",
]
