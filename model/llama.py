"""Llama 3 as Flax Linen modules, used only through pure ``init``/``apply``.

Parameter tree (``scan_layers=True`` stacks the layers on a leading ``[layers]`` axis under
``layers``; otherwise they are ``layers_0 … layers_{L-1}``)::

    embed_tokens/embedding        [v, d]     ("vocab", "embed")
    layers/input_norm/scale       [d]        ("embed",)
    layers/attn/{q_proj}/kernel   [d, n, h]  ("embed", "heads", "head_dim")
    layers/attn/{k,v}_proj/kernel [d, k, h]  ("embed", "kv_heads", "head_dim")
    layers/attn/o_proj/kernel     [n, h, d]  ("heads", "head_dim", "embed")
    layers/post_attn_norm/scale   [d]
    layers/mlp/{gate,up}_proj/kernel [d, f]  ("embed", "mlp")
    layers/mlp/down_proj/kernel   [f, d]     ("mlp", "embed")
    norm/scale                    [d]
    lm_head/kernel                [d, v]     ("embed", "vocab")   (absent when tied)

KV cache (`model.cache.init_cache`): ``k``/``v`` ``[layers, b, S, k, h]``, ``positions``
``[b, S]`` (empty slots hold a position later than any query, so causal masking hides them)
and ``index``, the next slot to write.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention import attention, axes
from model import layers as L
from model import lora as lora_lib
from model.config import LlamaConfig
from model.rope import rope_cos_sin, rotate

_INIT = nn.initializers.normal(stddev=0.02)

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _constrain(x: jax.Array, names: tuple[str, ...], mesh) -> jax.Array:
    """Shard an activation by the logical-axis rules the caller installed (`attention.axes`).

    Without a mesh there is nothing to shard; with one and no rules installed it raises.
    """
    return x if mesh is None else axes.constrain(x, names, mesh)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...], init=_INIT) -> jax.Array:
    cfg = module.config
    return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.dtype(cfg.param_dtype))


class Attention(nn.Module):
    """GQA self-attention; K/V stay at ``kv_heads`` all the way into `attention.attention`.

    ``return_kv``: without a cache, also return the rotated ``{"k", "v"}`` of this call (a
    prefill that builds a KV cache from a ring-attention forward, `model.generate`).
    """

    config: LlamaConfig
    mesh: Any = None
    return_kv: bool = False
    lora: Any = None  # model.lora.LoraConfig: adapters on its targets

    @nn.compact
    def __call__(self, x_btd, ctx, layer_cache):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_w, q_ad = _adapted_param(self, "q_proj", (d, n, h), ("embed", "heads", "head_dim"), 1)
        k_w, k_ad = _adapted_param(self, "k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        v_w, v_ad = _adapted_param(self, "v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), 1)
        o_w, o_ad = _adapted_param(self, "o_proj", (n, h, d), ("heads", "head_dim", "embed"), 2)
        q, k_new, v_new = L.project_qkv(x_btd, q_w.astype(dt), k_w.astype(dt), v_w.astype(dt))
        q = lora_lib.add_delta(q, x_btd, q_ad, self.lora)
        k_new = lora_lib.add_delta(k_new, x_btd, k_ad, self.lora)
        v_new = lora_lib.add_delta(v_new, x_btd, v_ad, self.lora)
        q = rotate(q, ctx["cos"], ctx["sin"])
        k_new = rotate(k_new, ctx["cos"], ctx["sin"])
        if layer_cache is None:
            q = _constrain(q, ("batch", "length", "heads", "head_dim"), self.mesh)
            k_new = _constrain(k_new, ("batch", "length", "kv_heads", "head_dim"), self.mesh)
            v_new = _constrain(v_new, ("batch", "length", "kv_heads", "head_dim"), self.mesh)
            keys, values, kv_pos, new_cache = k_new, v_new, ctx["positions"], None
            if self.return_kv:
                new_cache = {"k": k_new, "v": v_new}
        else:
            start = (0, ctx["cache_index"], 0, 0)
            keys = jax.lax.dynamic_update_slice(layer_cache["k"], k_new.astype(layer_cache["k"].dtype), start)
            values = jax.lax.dynamic_update_slice(layer_cache["v"], v_new.astype(layer_cache["v"].dtype), start)
            kv_pos, new_cache = ctx["kv_positions"], {"k": keys, "v": values}
            keys, values = keys.astype(dt), values.astype(dt)
        mesh = self.mesh if layer_cache is None else None
        # Default positions in one document have a mask-free form (is_causal): passing None lets
        # `attention` reach cuDNN on GPU; every other implementation rebuilds the same arange.
        # (ctx carries None for them: pytree structure is static through the layer scan, a flag is not.)
        plain = layer_cache is None and ctx["positions"] is None
        out = attention(
            q,
            keys,
            values,
            causal=True,
            segment_ids=ctx["segment_ids"] if layer_cache is None else None,
            q_positions=None if plain else ctx["positions"],
            kv_positions=None if plain else kv_pos,
            impl=_impl(cfg, mesh),
            mesh=mesh,
            chunk_size=cfg.attention_chunk,
            kernel=cfg.attention_kernel,
            ulysses_size=cfg.ulysses_size or None,
        )
        return lora_lib.add_delta(L.project_out(out, o_w.astype(dt)), out, o_ad, self.lora), new_cache


def _impl(cfg: LlamaConfig, mesh) -> str:
    """``attention_impl``, with ``auto`` on a sequence-sharded mesh refined by ``context_parallel``."""
    sharded = mesh is not None and dict(mesh.shape).get("sequence", 1) > 1
    if cfg.attention_impl == "auto" and sharded and cfg.context_parallel != "auto":
        return cfg.context_parallel
    return cfg.attention_impl


def _scoped_param(module: nn.Module, name: str, shape, names) -> jax.Array:
    """A ``{name}/kernel`` parameter, matching the HF module nesting (``q_proj.weight``)."""
    return _Kernel(module.config, shape, names, name=name)()


def _adapted_param(module: nn.Module, name: str, shape, names, n_in: int):
    """``(kernel, (lora_a, lora_b) or None)``: the factors exist when ``module.lora`` targets ``name``."""
    cfg = module.lora
    if cfg is None or name not in cfg.modules:
        return _scoped_param(module, name, shape, names), None
    return _Kernel(module.config, shape, names, adapter=(cfg.rank, n_in), name=name)()


class _Kernel(nn.Module):
    config: LlamaConfig
    shape: tuple[int, ...]
    names: tuple[str, ...]
    adapter: tuple[int, int] | None = None  # (rank, input dims): also declare LoRA factors beside the kernel

    @nn.compact
    def __call__(self):
        kernel = _param(self, "kernel", self.shape, self.names)
        if self.adapter is None:
            return kernel
        rank, n_in = self.adapter
        return kernel, lora_lib.create_factors(self, self.shape, self.names, n_in, rank, self.config.param_dtype)


class _Embedding(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        cfg = self.config
        return _param(self, "embedding", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))


class RMSNorm(nn.Module):
    """RMSNorm with a learned ``scale [d]`` (the parameter name HF conversion maps to ``*_layernorm.weight``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_btd):
        scale = _param(self, "scale", (self.config.hidden_size,), ("embed",), nn.initializers.ones)
        return L.rms_norm(x_btd, scale, self.config.rms_norm_eps)


class Mlp(nn.Module):
    config: LlamaConfig
    lora: Any = None

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        d, f = cfg.hidden_size, cfg.intermediate_size
        gate, g_ad = _adapted_param(self, "gate_proj", (d, f), ("embed", "mlp"), 1)
        up, u_ad = _adapted_param(self, "up_proj", (d, f), ("embed", "mlp"), 1)
        down, d_ad = _adapted_param(self, "down_proj", (f, d), ("mlp", "embed"), 1)
        if g_ad is None and u_ad is None and d_ad is None:
            return L.swiglu_mlp(x_btd, gate.astype(dt), up.astype(dt), down.astype(dt))
        add = lambda y, x, ad: lora_lib.add_delta(y, x, ad, self.lora)
        gate_btf = add(jnp.einsum("btd,df->btf", x_btd, gate.astype(dt)), x_btd, g_ad)  # [b, t, f]
        up_btf = add(jnp.einsum("btd,df->btf", x_btd, up.astype(dt)), x_btd, u_ad)  # [b, t, f]
        hidden_btf = jax.nn.silu(gate_btf) * up_btf
        return add(jnp.einsum("btf,fd->btd", hidden_btf, down.astype(dt)), hidden_btf, d_ad)  # [b, t, d]


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals; ``(x, layer_cache, ctx) -> (x, new_cache)``.

    Scanned (``ctx`` omitted) the context rides in the carry: ``((x, ctx), cache) -> ((x, ctx), new_cache)``.
    """

    config: LlamaConfig
    mesh: Any = None
    return_kv: bool = False
    lora: Any = None

    @nn.compact
    def __call__(self, x_btd, layer_cache, ctx=None):
        carried = ctx is None
        if carried:
            # Not an nn.broadcast input on purpose: Flax partially evaluates a scan body on its
            # broadcast inputs, and JAX's partial evaluation drops the custom VJP of any call whose
            # inputs are part known, part unknown. Attention (positions known, q/k/v not) would then
            # be differentiated through its chunk loops, saving every chunk's probabilities: O(t²).
            x_btd, ctx = x_btd
        # Named scopes: a profile or HLO dump reads "attention" and "mlp", not Flax's module paths.
        with jax.named_scope("attention"):
            attn_out, new_cache = Attention(self.config, self.mesh, self.return_kv, self.lora, name="attn")(
                RMSNorm(self.config, name="input_norm")(x_btd), ctx, layer_cache
            )
        x_btd = x_btd + attn_out
        with jax.named_scope("mlp"):
            mlp_out = Mlp(self.config, self.lora, name="mlp")(RMSNorm(self.config, name="post_attn_norm")(x_btd))
        x_btd = x_btd + mlp_out
        if layer_cache is None:
            x_btd = _constrain(x_btd, ("batch", "length", "embed"), self.mesh)
        return ((x_btd, ctx) if carried else x_btd), new_cache


class Llama(nn.Module):
    """Llama 3 causal LM.

    ``apply({"params": p}, tokens[b, t], positions=None, segment_ids=None)`` → logits
    ``[b, t, v]``; with ``return_hidden=True`` the final-norm hidden states ``[b, t, d]``
    instead (the training loss applies the head in chunks); with ``cache=`` a
    ``(logits, new_cache)`` pair. With ``mesh`` (needed for ring attention) activations are
    constrained by the logical-axis rules the caller installs around ``apply``
    (``with sharding.axis_rules(mesh):``); without them it raises `attention.axes.RulesError`. With
    ``return_kv=True`` (and no cache) a ``(logits, {"k", "v"})`` pair, K/V ``[layers, b, t, k, h]``.
    ``lora`` (a `model.lora.LoraConfig`): LoRA factors beside its target kernels in the params.
    """

    config: LlamaConfig
    mesh: Any = None
    lora: Any = None

    @nn.compact
    def __call__(
        self, tokens, positions=None, segment_ids=None, cache=None, return_hidden: bool = False, return_kv: bool = False
    ):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        plain = positions is None and segment_ids is None and cache is None  # arange in one document
        if positions is None:
            start = 0 if cache is None else cache["index"]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = positions.astype(jnp.int32)
        cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        ctx = {"cos": cos, "sin": sin, "positions": None if plain else positions, "segment_ids": segment_ids}
        if cache is not None:
            ctx["cache_index"] = cache["index"]
            ctx["kv_positions"] = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, cache["index"]))

        embedding = _Embedding(cfg, name="embed_tokens")()
        x = jnp.take(embedding, tokens, axis=0).astype(dt)  # [b, t, d]
        mesh = self.mesh if cache is None else None  # decoding with a cache runs unsharded
        x = _constrain(x, ("batch", "length", "embed"), mesh)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(
                DecoderLayer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        layer_caches = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        if cfg.scan_layers:
            stack = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=0,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.mesh, return_kv, self.lora, name="layers")
            (x, _), new_layer_caches = stack((x, ctx), layer_caches)  # ctx in the carry: see DecoderLayer
        else:
            new = []
            for i in range(cfg.num_layers):
                one = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
                x, c = layer_cls(cfg, self.mesh, return_kv, self.lora, name=f"layers_{i}")(x, one, ctx)
                new.append(c)
            new_layer_caches = None if new[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
        x = RMSNorm(cfg, name="norm")(x)
        if return_hidden:
            out = x
        else:
            head = (
                embedding.T
                if cfg.tie_word_embeddings
                else _scoped_param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
            )
            out = jnp.einsum("btd,dv->btv", x, head.astype(dt))  # [b, t, v]
            out = _constrain(out, ("batch", "length", "vocab"), mesh)
        if cache is None:
            return (out, new_layer_caches) if return_kv else out
        new_cache = {
            "k": new_layer_caches["k"],
            "v": new_layer_caches["v"],
            "positions": ctx["kv_positions"],
            "index": cache["index"] + t,
        }
        return out, new_cache
