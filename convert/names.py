"""The one Hugging Face ⇄ ringllama name map, with per-tensor transforms that assert shapes.

Both directions read the same `RULES` table: one declarative rule per module (parameter path →
HF name, transform). Which tensors exist and their shapes come from the model's own abstract
parameters (`model.abstract_params`), so the map cannot drift from the model: a parameter
without a rule, or a rule without a parameter, is an error. HF ``nn.Linear`` weights are ``[out, in]``;
ringllama kernels are ``[in, out]`` with heads split out (``q_proj`` ``[d, n, h]``,
``o_proj`` ``[n, h, d]``), so every projection is a transpose plus a reshape — no
permutation, because both sides use the half-split RoPE layout.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from model.config import LlamaConfig
from model.params import abstract_params

Shape = tuple[int, ...]
Path_ = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and the fix."""


@dataclass(frozen=True)
class Transform:
    """How one weight changes layout between HF and ringllama, given the ringllama shape ``s``."""

    hf_shape: Callable[[Shape], Shape]  # ringllama shape -> HF shape
    to_flax: Callable[[np.ndarray, Shape], np.ndarray]  # (HF array, ringllama shape) -> ringllama array
    to_hf: Callable[[np.ndarray], np.ndarray]


SAME = Transform(lambda s: s, lambda x, s: x, lambda x: x)
TRANSPOSE = Transform(lambda s: s[::-1], lambda x, s: x.T, lambda x: x.T)
# q/k/v: HF [heads·h, d] ⇄ ringllama [d, heads, h] (the output features split into heads).
SPLIT_OUT = Transform(lambda s: (s[1] * s[2], s[0]), lambda x, s: x.T.reshape(s), lambda x: x.reshape(x.shape[0], -1).T)
# o: HF [d, n·h] ⇄ ringllama [n, h, d] (the input features split into heads).
SPLIT_IN = Transform(lambda s: (s[2], s[0] * s[1]), lambda x, s: x.T.reshape(s), lambda x: x.reshape(-1, x.shape[-1]).T)


@dataclass(frozen=True)
class Rule:
    """One module: its parameter path (inside a layer for per-layer ones), HF name (``{i}`` = layer), transform.

    Shapes are not kept here: they come from the model's abstract parameters (`model.abstract_params`).
    """

    path: tuple[str, ...]
    hf: str
    transform: Transform

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def flax_shape(self, cfg: LlamaConfig) -> Shape:
        """The ringllama shape of one tensor (one layer's slice when layers are stacked)."""
        return _shapes(cfg)[1 if self.per_layer else 0][self.path]

    def hf_shape(self, cfg: LlamaConfig) -> Shape:
        return self.transform.hf_shape(self.flax_shape(cfg))

    def to_flax(self, x: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
        return self.transform.to_flax(x, self.flax_shape(cfg))

    def to_hf(self, x: np.ndarray, cfg: LlamaConfig) -> np.ndarray:
        return self.transform.to_hf(x)


_P = "model.layers.{i}."
# The one declarative map, module by module, in the order tensors are written.
RULES: tuple[Rule, ...] = (
    Rule(("embed_tokens", "embedding"), "model.embed_tokens.weight", SAME),
    Rule(("norm", "scale"), "model.norm.weight", SAME),
    Rule(("lm_head", "kernel"), "lm_head.weight", TRANSPOSE),
    Rule(("input_norm", "scale"), _P + "input_layernorm.weight", SAME),
    Rule(("post_attn_norm", "scale"), _P + "post_attention_layernorm.weight", SAME),
    Rule(("attn", "q_proj", "kernel"), _P + "self_attn.q_proj.weight", SPLIT_OUT),
    Rule(("attn", "k_proj", "kernel"), _P + "self_attn.k_proj.weight", SPLIT_OUT),
    Rule(("attn", "v_proj", "kernel"), _P + "self_attn.v_proj.weight", SPLIT_OUT),
    Rule(("attn", "o_proj", "kernel"), _P + "self_attn.o_proj.weight", SPLIT_IN),
    Rule(("mlp", "gate_proj", "kernel"), _P + "mlp.gate_proj.weight", TRANSPOSE),
    Rule(("mlp", "up_proj", "kernel"), _P + "mlp.up_proj.weight", TRANSPOSE),
    Rule(("mlp", "down_proj", "kernel"), _P + "mlp.down_proj.weight", TRANSPOSE),
)


@functools.lru_cache(maxsize=32)
def _shapes(cfg: LlamaConfig) -> tuple[dict[Path_, Shape], dict[Path_, Shape], dict[Path_, Shape]]:
    """From `model.abstract_params`: ``(top-level path -> shape, in-layer path -> one layer's shape,
    full path -> shape)``; every parameter must have a rule, every rule (but a tied head) a parameter."""
    boxed = abstract_params(cfg)
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    full = {tuple(k.key for k in path): tuple(leaf.value.shape) for path, leaf in leaves}
    top: dict[Path_, Shape] = {}
    layer: dict[Path_, Shape] = {}
    for path, shape in full.items():
        if path[0] == "layers":  # stacked: [layers, ...]
            layer[path[1:]] = shape[1:]
        elif path[0].startswith("layers_"):
            layer.setdefault(path[1:], shape)
        else:
            top[path] = shape
    named = {r.path for r in RULES if r.per_layer}, {r.path for r in RULES if not r.per_layer}
    unnamed = sorted(set(layer) - named[0]) + sorted(set(top) - named[1])
    if unnamed:
        raise ConversionError(
            f"model parameter {'/'.join(unnamed[0])} has no Hugging Face name: add it to convert.names.RULES."
        )
    return top, layer, full


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[Rule, int | None]]:
    """Every HF tensor name this config needs → (rule, layer index or None)."""
    top, layer, _ = _shapes(cfg)
    out: dict[str, tuple[Rule, int | None]] = {}
    for rule in RULES:
        if rule.path not in (layer if rule.per_layer else top):
            if rule.path == ("lm_head", "kernel") and cfg.tie_word_embeddings:
                continue  # tied: the head is the embedding
            raise ConversionError(f"RULES names {'/'.join(rule.path)} but the model has no such parameter.")
        if rule.per_layer:
            for i in range(cfg.num_layers):
                out[rule.hf.format(i=i)] = (rule, i)
        else:
            out[rule.hf] = (rule, None)
    return out


# Tensors some checkpoints carry that hold nothing the model needs.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
    return dict(_shapes(cfg)[2])


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
