"""`TrainState` (params, optimizer state, step) and its sharded creation.

Parameters and every parameter-shaped optimizer leaf (Adam's ``mu``/``nu``) are sharded by the
rules table (`sharding.rules`: FSDP over ``fsdp`` on ``embed``, heads/mlp/vocab over ``tensor``);
counters are replicated. `init_state` runs the initialisers under ``jax.jit`` with those
``out_shardings`` so no full-size array is ever materialised on one device, and `abstract_state`
gives the same tree as sharded ``jax.ShapeDtypeStruct`` leaves — the restore target for a
checkpoint on *this* mesh, whatever mesh wrote it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from model.config import LlamaConfig
from model.params import abstract_params, init_params
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


def _unboxed_abstract_params(cfg: LlamaConfig) -> Any:
    import flax.linen as nn

    return nn.meta.unbox(abstract_params(cfg))


def state_shardings(model_cfg: LlamaConfig, optim_cfg: OptimConfig, mesh: Mesh) -> TrainState:
    """A `TrainState` of `NamedSharding` for ``mesh`` (params and moments by the rules table)."""
    tx = make_optimizer(optim_cfg)
    params_abs = _unboxed_abstract_params(model_cfg)
    p_sh = param_shardings(model_cfg, mesh)
    opt_abs = jax.eval_shape(tx.init, params_abs)
    o_sh = opt_state_shardings(opt_abs, p_sh, params_abs, mesh)
    return TrainState(params=p_sh, opt_state=o_sh, step=replicated(mesh))


def abstract_state(model_cfg: LlamaConfig, optim_cfg: OptimConfig, mesh: Mesh) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct`` leaves carrying ``mesh``'s shardings (a restore target)."""
    tx = make_optimizer(optim_cfg)
    params_abs = _unboxed_abstract_params(model_cfg)
    shapes = TrainState(
        params=params_abs,
        opt_state=jax.eval_shape(tx.init, params_abs),
        step=jax.ShapeDtypeStruct((), jnp.int32),
    )
    shardings = state_shardings(model_cfg, optim_cfg, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_opt_state(params: Any, optim_cfg: OptimConfig, shardings: TrainState) -> Any:
    """Fresh optimizer state for ``params`` (e.g. at a stage that does not carry the moments)."""
    tx = make_optimizer(optim_cfg)
    return jax.jit(tx.init, out_shardings=shardings.opt_state)(params)


def init_state(
    model_cfg: LlamaConfig, optim_cfg: OptimConfig, key: jax.Array, mesh: Mesh, params: Any = None
) -> TrainState:
    """A sharded fresh state: random params from ``key`` (or the given ``params``, resharded), zero moments.

    Args:
        model_cfg: the model.
        optim_cfg: the optimizer (decides the optimizer-state tree).
        key: PRNG key for the parameter init.
        mesh: the device mesh; arrays are created directly in their shards.
        params: start from these parameters (e.g. ``--init-from``) instead of a random init.
    """
    sh = state_shardings(model_cfg, optim_cfg, mesh)
    if params is None:
        params = init_params(model_cfg, key, out_shardings=sh.params)
    else:
        params = jax.device_put(params, sh.params)
    opt_state = init_opt_state(params, optim_cfg, sh)
    step = jax.device_put(jnp.zeros((), jnp.int32), sh.step)
    return TrainState(params=params, opt_state=opt_state, step=step)
