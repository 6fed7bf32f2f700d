"""`TrainState` (params, optimizer state, step) and its sharded creation.

Parameters and every parameter-shaped optimizer leaf (Adam's ``mu``/``nu``) are sharded by the
rules table (`sharding.rules`: FSDP over ``fsdp`` on ``embed``, heads/mlp/vocab over ``tensor``);
counters are replicated. `init_state` runs the initialisers under ``jax.jit`` with those
``out_shardings`` so no full-size array is ever materialised on one device, and `abstract_state`
gives the same tree as sharded ``jax.ShapeDtypeStruct`` leaves — the restore target for a
checkpoint on *this* mesh, whatever mesh wrote it.

With LoRA (``lora=`` a `model.lora.LoraConfig`) the params split in two (`model.lora.split`):
``params`` holds only the trainable leaves (adapters, and embeddings/norms if asked) — the only
ones with gradients and Adam moments — and ``frozen`` the base weights, optionally stored in
``lora.base_dtype`` (bf16 halves them). Checkpoints hold everything but ``frozen``; a restore
re-attaches the base from ``--init-from`` (`frozen_params`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from model import lora as lora_lib
from model.config import LlamaConfig
from model.params import _init_fn, abstract_params, init_params
from sharding.rules import opt_state_shardings, param_shardings, replicated
from train.optim import OptimConfig, make_optimizer


@struct.dataclass
class TrainState:
    """What a train step reads and writes.

    ``step`` counts optimizer updates within the current curriculum stage (it drives the
    learning-rate schedule); the global step across stages lives in the checkpoint metadata.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    frozen: Any = None  # LoRA only: the frozen base leaves (never checkpointed)


def _unboxed_abstract_params(cfg: LlamaConfig, lora: lora_lib.LoraConfig | None = None) -> Any:
    return nn.meta.unbox(abstract_params(cfg, lora))


def _random_base(model_cfg: LlamaConfig, mesh: Mesh, key: jax.Array) -> Any:
    """The random base a LoRA run without ``--init-from`` adapts (the same ``key`` gives the same base)."""
    return init_params(
        model_cfg, jax.random.fold_in(key, 1), out_shardings=param_shardings(abstract_params(model_cfg), mesh)
    )


def _split_trees(model_cfg: LlamaConfig, lora, tree: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)`` of a full-params-shaped tree (frozen None without LoRA)."""
    if lora is None:
        return tree, None
    return lora_lib.split(tree, lora)


def _frozen_abstract(model_cfg: LlamaConfig, lora) -> Any:
    frozen = _split_trees(model_cfg, lora, _unboxed_abstract_params(model_cfg, lora))[1]
    dtype = jnp.dtype(lora.base_dtype) if lora.base_dtype else None
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype), frozen)


def state_shardings(
    model_cfg: LlamaConfig, optim_cfg: OptimConfig, mesh: Mesh, lora: lora_lib.LoraConfig | None = None
) -> TrainState:
    """A `TrainState` of `NamedSharding` for ``mesh`` (params and moments by the rules table)."""
    tx = make_optimizer(optim_cfg)
    params_abs, _ = _split_trees(model_cfg, lora, _unboxed_abstract_params(model_cfg, lora))
    p_sh, f_sh = _split_trees(model_cfg, lora, param_shardings(abstract_params(model_cfg, lora), mesh))
    opt_abs = jax.eval_shape(tx.init, params_abs)
    o_sh = opt_state_shardings(opt_abs, p_sh, params_abs, mesh)
    return TrainState(params=p_sh, opt_state=o_sh, step=replicated(mesh), frozen=f_sh)


def abstract_state(
    model_cfg: LlamaConfig,
    optim_cfg: OptimConfig,
    mesh: Mesh,
    lora: lora_lib.LoraConfig | None = None,
    *,
    with_frozen: bool = False,
) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying ``mesh``'s shardings (a restore target).

    ``frozen`` is None — checkpoints do not hold the LoRA base (attach it with `frozen_params`) —
    unless ``with_frozen`` (e.g. to lower a LoRA train step on abstract inputs).
    """
    tx = make_optimizer(optim_cfg)
    params_abs, _ = _split_trees(model_cfg, lora, _unboxed_abstract_params(model_cfg, lora))
    shapes = TrainState(
        params=params_abs,
        opt_state=jax.eval_shape(tx.init, params_abs),
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shardings = state_shardings(model_cfg, optim_cfg, mesh, lora)
    if with_frozen and lora is not None:
        shapes = shapes.replace(frozen=_frozen_abstract(model_cfg, lora))
    else:
        shardings = shardings.replace(frozen=None)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def frozen_params(
    model_cfg: LlamaConfig, lora: lora_lib.LoraConfig, mesh: Mesh, base: Any = None, key: jax.Array | None = None
) -> Any:
    """The frozen base leaves of a LoRA state, in ``lora.base_dtype``, sharded by the rules table.

    Args:
        model_cfg: the model.
        lora: the adapters' config (decides which leaves are frozen).
        mesh: the device mesh.
        base: the base model's params (e.g. from ``--init-from``); None: a random init from ``key``.
        key: PRNG key for the random base (the same key gives the same base).
    """
    f_sh = state_shardings(model_cfg, OptimConfig(), mesh, lora).frozen
    dtype = jnp.dtype(lora.base_dtype) if lora.base_dtype else None
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype or x.dtype), t)
    if base is None:
        base = _random_base(model_cfg, mesh, key)
    return jax.jit(lambda p: cast(lora_lib.split(p, lora)[1]), out_shardings=f_sh)(base)


def full_params(state: TrainState) -> Any:
    """Every parameter leaf of ``state`` (trainable and frozen together)."""
    return state.params if state.frozen is None else lora_lib.combine(state.params, state.frozen)


def merged_params(state: TrainState, model_cfg: LlamaConfig, lora: lora_lib.LoraConfig | None, mesh: Mesh) -> Any:
    """The base-model tree a LoRA state stands for (``W + (α/r)·A·B``, in ``param_dtype``), sharded.

    Without LoRA it is ``state.params``. Evaluation and export take this tree, so they need no LoRA code.
    """
    if lora is None:
        return state.params
    sh = param_shardings(abstract_params(model_cfg), mesh)
    dtype = jnp.dtype(model_cfg.param_dtype)
    fn = lambda p, f: jax.tree.map(lambda x: x.astype(dtype), lora_lib.merge(lora_lib.combine(p, f), lora))
    return jax.jit(fn, out_shardings=sh)(state.params, state.frozen)


def init_opt_state(params: Any, optim_cfg: OptimConfig, shardings: TrainState) -> Any:
    """Fresh optimizer state for the trainable ``params`` (e.g. at a stage that does not carry the moments)."""
    tx = make_optimizer(optim_cfg)
    return jax.jit(tx.init, out_shardings=shardings.opt_state)(params)


def init_state(
    model_cfg: LlamaConfig,
    optim_cfg: OptimConfig,
    key: jax.Array,
    mesh: Mesh,
    params: Any = None,
    lora: lora_lib.LoraConfig | None = None,
) -> TrainState:
    """A sharded fresh state: random params from ``key`` (or the given ``params``, resharded), zero moments.

    Args:
        model_cfg: the model.
        optim_cfg: the optimizer (decides the optimizer-state tree).
        key: PRNG key for the parameter init (with LoRA: the adapters' A, and a random base if no ``params``).
        mesh: the device mesh; arrays are created directly in their shards.
        params: start from these parameters (e.g. ``--init-from``) instead of a random init; with
            LoRA these are the base model's (no adapters).
        lora: train LoRA adapters on a frozen base instead of every parameter.
    """
    sh = state_shardings(model_cfg, optim_cfg, mesh, lora)
    frozen = None
    if lora is not None:
        full_sh = param_shardings(abstract_params(model_cfg, lora), mesh)
        adapter_sh = lora_lib.adapters(full_sh)
        # Only the adapters leave the jit, so XLA drops the base initialisers it does not need.
        fresh = jax.jit(
            lambda k: lora_lib.adapters(nn.meta.unbox(_init_fn(model_cfg, lora)(k))), out_shardings=adapter_sh
        )
        if params is None:
            params = _random_base(model_cfg, mesh, key)
        frozen = frozen_params(model_cfg, lora, mesh, base=params)
        trainable_base = lora_lib.split(params, lora)[0]
        params = jax.device_put(lora_lib.combine(trainable_base, fresh(key)), sh.params)
    elif params is None:
        params = init_params(model_cfg, key, out_shardings=sh.params)
    else:
        params = jax.device_put(params, sh.params)
    opt_state = init_opt_state(params, optim_cfg, sh)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(params=params, opt_state=opt_state, step=step, frozen=frozen)
