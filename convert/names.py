"""The one Hugging Face ⇄ ringllama name map, with per-tensor transforms that assert shapes.

Both directions read the same `RULES` table. HF ``nn.Linear`` weights are ``[out, in]``;
ringllama kernels are ``[in, out]`` with heads split out (``q_proj`` ``[d, n, h]``,
``o_proj`` ``[n, h, d]``), so every projection is a transpose plus a reshape — no
permutation, because both sides use the half-split RoPE layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.config import LlamaConfig

ShapeFn = Callable[[LlamaConfig], tuple[int, ...]]


class ConversionError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Rule:
    """One tensor: HF name template (``{i}`` = layer), ringllama path, shapes and transforms."""

    hf: str
    path: tuple[str, ...]
    hf_shape: ShapeFn
    flax_shape: ShapeFn
    to_flax: Callable[[np.ndarray, LlamaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, LlamaConfig], np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _same(x, cfg):
    return x


def _t(x, cfg):
    return x.T


def _linear(heads_attr: str) -> tuple[Callable, Callable]:
    """HF ``[heads·h, d]`` ⇄ ringllama ``[d, heads, h]``."""

    def to_flax(x, cfg):
        return x.T.reshape(cfg.hidden_size, getattr(cfg, heads_attr), cfg.head_dim)

    def to_hf(x, cfg):
        return x.reshape(cfg.hidden_size, -1).T

    return to_flax, to_hf


def _o_to_flax(x, cfg):
    return x.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_to_hf(x, cfg):
    return x.reshape(-1, cfg.hidden_size).T


_Q = _linear("num_heads")
_KV = _linear("num_kv_heads")
_P = "model.layers.{i}."

RULES: tuple[Rule, ...] = (
    Rule(
        "model.embed_tokens.weight",
        ("embed_tokens", "embedding"),
        lambda c: (c.vocab_size, c.hidden_size),
        lambda c: (c.vocab_size, c.hidden_size),
        _same,
        _same,
    ),
    Rule("model.norm.weight", ("norm", "scale"), lambda c: (c.hidden_size,), lambda c: (c.hidden_size,), _same, _same),
    Rule(
        "lm_head.weight",
        ("lm_head", "kernel"),
        lambda c: (c.vocab_size, c.hidden_size),
        lambda c: (c.hidden_size, c.vocab_size),
        _t,
        _t,
    ),
    Rule(
        _P + "input_layernorm.weight",
        ("input_norm", "scale"),
        lambda c: (c.hidden_size,),
        lambda c: (c.hidden_size,),
        _same,
        _same,
    ),
    Rule(
        _P + "post_attention_layernorm.weight",
        ("post_attn_norm", "scale"),
        lambda c: (c.hidden_size,),
        lambda c: (c.hidden_size,),
        _same,
        _same,
    ),
    Rule(
        _P + "self_attn.q_proj.weight",
        ("attn", "q_proj", "kernel"),
        lambda c: (c.num_heads * c.head_dim, c.hidden_size),
        lambda c: (c.hidden_size, c.num_heads, c.head_dim),
        *_Q,
    ),
    Rule(
        _P + "self_attn.k_proj.weight",
        ("attn", "k_proj", "kernel"),
        lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        *_KV,
    ),
    Rule(
        _P + "self_attn.v_proj.weight",
        ("attn", "v_proj", "kernel"),
        lambda c: (c.num_kv_heads * c.head_dim, c.hidden_size),
        lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim),
        *_KV,
    ),
    Rule(
        _P + "self_attn.o_proj.weight",
        ("attn", "o_proj", "kernel"),
        lambda c: (c.hidden_size, c.num_heads * c.head_dim),
        lambda c: (c.num_heads, c.head_dim, c.hidden_size),
        _o_to_flax,
        _o_to_hf,
    ),
    Rule(
        _P + "mlp.gate_proj.weight",
        ("mlp", "gate_proj", "kernel"),
        lambda c: (c.intermediate_size, c.hidden_size),
        lambda c: (c.hidden_size, c.intermediate_size),
        _t,
        _t,
    ),
    Rule(
        _P + "mlp.up_proj.weight",
        ("mlp", "up_proj", "kernel"),
        lambda c: (c.intermediate_size, c.hidden_size),
        lambda c: (c.hidden_size, c.intermediate_size),
        _t,
        _t,
    ),
    Rule(
        _P + "mlp.down_proj.weight",
        ("mlp", "down_proj", "kernel"),
        lambda c: (c.hidden_size, c.intermediate_size),
        lambda c: (c.intermediate_size, c.hidden_size),
        _t,
        _t,
    ),
)

# Tensors some checkpoints carry that hold nothing the model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[Rule, int | None]]:
    """Every HF tensor name this config needs → (rule, layer index or None)."""
    out: dict[str, tuple[Rule, int | None]] = {}
    for rule in RULES:
        if rule.hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if rule.per_layer:
            for i in range(cfg.num_layers):
                out[rule.hf.format(i=i)] = (rule, i)
        else:
            out[rule.hf] = (rule, None)
    return out


def is_ignored(name: str) -> bool:
    """Legacy tensors that are skipped on import."""
    return name.endswith(IGNORED_SUFFIXES)


def hf_to_flax(name: str, array: np.ndarray, rule: Rule, cfg: LlamaConfig) -> np.ndarray:
    """Transform one HF tensor, checking its shape on both sides."""
    want = rule.hf_shape(cfg)
    if tuple(array.shape) != want:
        raise ConversionError(
            f"tensor {name} has shape {tuple(array.shape)} but the config implies {want}: "
            "the checkpoint and its config.json disagree."
        )
    out = np.ascontiguousarray(rule.to_flax(array, cfg))
    assert out.shape == rule.flax_shape(cfg), (name, out.shape)
    return out


def flax_to_hf(name: str, array: np.ndarray, rule: Rule, cfg: LlamaConfig) -> np.ndarray:
    """Transform one ringllama tensor into its HF layout, checking shapes."""
    want = rule.flax_shape(cfg)
    if tuple(array.shape) != want:
        raise ConversionError(
            f"parameter {'/'.join(rule.path)} for {name} has shape {tuple(array.shape)}, expected {want}."
        )
    out = np.ascontiguousarray(rule.to_hf(array, cfg))
    assert out.shape == rule.hf_shape(cfg), (name, out.shape)
    return out


def _layer_root(params: dict[str, Any], cfg: LlamaConfig, layer: int | None) -> tuple[dict[str, Any], int | None]:
    if layer is None:
        return params, None
    if cfg.scan_layers:
        return params["layers"], layer
    return params[f"layers_{layer}"], None


def get_param(params: dict[str, Any], rule: Rule, layer: int | None, cfg: LlamaConfig):
    """The ringllama array for one HF tensor (a layer slice when layers are stacked)."""
    node, index = _layer_root(params, cfg, layer)
    for key in rule.path:
        node = node[key]
    return node if index is None else node[index]


def param_paths(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every ringllama parameter path → its shape, in the layout ``cfg.scan_layers`` selects."""
    out: dict[tuple[str, ...], tuple[int, ...]] = {}
    for rule, layer in expected_tensors(cfg).values():
        if layer is not None and cfg.scan_layers:
            out[("layers", *rule.path)] = (cfg.num_layers, *rule.flax_shape(cfg))
        elif layer is not None:
            out[(f"layers_{layer}", *rule.path)] = rule.flax_shape(cfg)
        else:
            out[rule.path] = rule.flax_shape(cfg)
    return out


def empty_params(cfg: LlamaConfig, dtype) -> dict[str, Any]:
    """A numpy parameter tree of the right shapes to fill tensor by tensor."""
    params: dict[str, Any] = {}
    for path, shape in param_paths(cfg).items():
        root = params
        for key in path[:-1]:
            root = root.setdefault(key, {})
        root[path[-1]] = np.empty(shape, dtype)
    return params


def set_param(params: dict[str, Any], rule: Rule, layer: int | None, cfg: LlamaConfig, value: np.ndarray) -> None:
    """Write one converted tensor into a tree made by `empty_params`."""
    node, index = _layer_root(params, cfg, layer)
    for key in rule.path[:-1]:
        node = node[key]
    if index is None:
        node[rule.path[-1]] = value.astype(node[rule.path[-1]].dtype, copy=False)
    else:
        node[rule.path[-1]][index] = value


def iter_hf_tensors(params: dict[str, Any], cfg: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, array)`` one tensor at a time (for streaming export)."""
    for name, (rule, layer) in expected_tensors(cfg).items():
        yield name, flax_to_hf(name, np.asarray(get_param(params, rule, layer, cfg)), rule, cfg)
