"""`TrainState` (params, optimizer state, step) and its sharded creation.

Parameters and every parameter-shaped optimizer leaf (Adam's ``mu``/``nu``) are sharded by the
rules table (`sharding.rules`: FSDP over ``fsdp`` on ``embed``, heads/mlp/vocab over ``tensor``);
counters are replicated. `abstract_state` gives the tree as sharded ``jax.ShapeDtypeStruct`` leaves
from the *built* optimizer and parameter shardings — with ``frozen=None`` it is the restore target
for a checkpoint on *this* mesh, whatever mesh wrote it — and `init_state` runs the initialisers
under ``jax.jit`` with its shardings as ``out_shardings`` so no full-size array is ever materialised
on one device. Nothing here builds an optimizer or a sharding from a config: `train.stage` builds
each once per stage and passes them in.

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
import optax
from flax import struct
from jax.sharding import Mesh

from model import lora as lora_lib
from model.config import LlamaConfig
from model.params import abstract_params, boxed_init_fn, init_params
from sharding.rules import opt_state_shardings, replicated


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


def _random_base(model_cfg: LlamaConfig, key: jax.Array, base_shardings: Any) -> Any:
    """The random base a LoRA run without ``--init-from`` adapts (the same ``key`` gives the same base)."""
    return init_params(model_cfg, jax.random.fold_in(key, 1), out_shardings=base_shardings)


def _split_trees(lora, tree: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)`` of a full-params-shaped tree (frozen None without LoRA)."""
    if lora is None:
        return tree, None
    return lora_lib.split(tree, lora)


def abstract_state(
    model_cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    param_sh: Any,
    mesh: Mesh,
    lora: lora_lib.LoraConfig | None = None,
) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying their shardings on ``mesh``.

    Args:
        model_cfg: the model.
        tx: the built optimizer (its ``init`` decides the optimizer-state tree).
        param_sh: the `NamedSharding` tree of every parameter (with LoRA: adapters included).
        mesh: the device mesh (replicated counters).
        lora: split the params into trainable ``params`` and ``frozen`` (in ``lora.base_dtype``).

    Returns:
        A `TrainState`; moments share their parameter's sharding. A checkpoint's restore target is
        this with ``frozen=None`` (checkpoints do not hold the LoRA base).
    """
    params_abs, frozen_abs = _split_trees(lora, nn.meta.unbox(abstract_params(model_cfg, lora)))
    p_sh, f_sh = _split_trees(lora, param_sh)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    o_sh = opt_state_shardings(opt_abs, p_sh, params_abs, mesh)
    if lora is not None and lora.base_dtype:
        frozen_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(lora.base_dtype)), frozen_abs)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(params=params_abs, opt_state=opt_abs, step=step, frozen=frozen_abs)
    shardings = TrainState(params=p_sh, opt_state=o_sh, step=replicated(mesh), frozen=f_sh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def state_shardings(abstract: TrainState) -> TrainState:
    """The `NamedSharding` of every leaf of an `abstract_state`."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def frozen_params(
    lora: lora_lib.LoraConfig, frozen_sh: Any, base: Any = None, *, model_cfg=None, key=None, base_shardings=None
) -> Any:
    """The frozen base leaves of a LoRA state, in ``lora.base_dtype``, sharded as ``frozen_sh``.

    Args:
        lora: the adapters' config (decides which leaves are frozen).
        frozen_sh: the frozen leaves' shardings (``state_shardings(abstract).frozen``).
        base: the base model's params (e.g. from ``--init-from``); None: a random init of ``model_cfg``
            from ``key`` placed as ``base_shardings`` (the same key gives the same base).
    """
    dtype = jnp.dtype(lora.base_dtype) if lora.base_dtype else None
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype or x.dtype), t)
    if base is None:
        base = _random_base(model_cfg, key, base_shardings)
    return jax.jit(lambda p: cast(lora_lib.split(p, lora)[1]), out_shardings=frozen_sh)(base)


def full_params(state: TrainState) -> Any:
    """Every parameter leaf of ``state`` (trainable and frozen together)."""
    return state.params if state.frozen is None else lora_lib.combine(state.params, state.frozen)


def merged_params(state: TrainState, model_cfg: LlamaConfig, lora: lora_lib.LoraConfig | None, base_sh: Any) -> Any:
    """The base-model tree a LoRA state stands for (``W + (α/r)·A·B``, in ``param_dtype``), as ``base_sh``.

    Without LoRA it is ``state.params``. Evaluation and export take this tree, so they need no LoRA code.
    """
    if lora is None:
        return state.params
    dtype = jnp.dtype(model_cfg.param_dtype)
    fn = lambda p, f: jax.tree.map(lambda x: x.astype(dtype), lora_lib.merge(lora_lib.combine(p, f), lora))
    return jax.jit(fn, out_shardings=base_sh)(state.params, state.frozen)


def init_opt_state(tx: optax.GradientTransformation, params: Any, shardings: TrainState) -> Any:
    """Fresh optimizer state for the trainable ``params`` (e.g. at a stage that does not carry the moments)."""
    return jax.jit(tx.init, out_shardings=shardings.opt_state)(params)


def init_state(
    model_cfg: LlamaConfig,
    tx: optax.GradientTransformation,
    key: jax.Array,
    shardings: TrainState,
    base_shardings: Any,
    params: Any = None,
    lora: lora_lib.LoraConfig | None = None,
) -> TrainState:
    """A sharded fresh state: random params from ``key`` (or the given ``params``, resharded), zero moments.

    Args:
        model_cfg: the model.
        tx: the built optimizer.
        key: PRNG key for the parameter init (with LoRA: the adapters' A, and a random base if no ``params``).
        shardings: the state's `state_shardings`; arrays are created directly in their shards.
        base_shardings: the base model's parameter shardings (no adapters).
        params: start from these parameters (e.g. ``--init-from``) instead of a random init; with
            LoRA these are the base model's (no adapters).
        lora: train LoRA adapters on a frozen base instead of every parameter.
    """
    sh = shardings
    frozen = None
    if lora is not None:
        # Only the adapters leave the jit, so XLA drops the base initialisers it does not need.
        fresh = jax.jit(
            lambda k: lora_lib.adapters(nn.meta.unbox(boxed_init_fn(model_cfg, lora)(k))),
            out_shardings=lora_lib.adapters(sh.params),
        )
        if params is None:
            params = _random_base(model_cfg, key, base_shardings)
        frozen = frozen_params(lora, sh.frozen, base=params)
        trainable_base = lora_lib.split(params, lora)[0]
        params = jax.device_put(lora_lib.combine(trainable_base, fresh(key)), sh.params)
    elif params is None:
        params = init_params(model_cfg, key, out_shardings=sh.params)
    else:
        params = jax.device_put(params, sh.params)
    opt_state = init_opt_state(tx, params, sh)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(params=params, opt_state=opt_state, step=step, frozen=frozen)
