"""The one logical-axis rules table and the helpers that turn logical names into shardings.

Parameters and activations carry logical axis names (``batch``, ``length``, ``embed``,
``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers``); `RULES_TABLE` maps
each name to mesh axes, with one column for parameters (and everything shaped like them:
gradients, optimizer moments) and one for activations:

=========  ==============  ===================  =========================================
name       params          activations          why
=========  ==============  ===================  =========================================
batch      –               (data, fsdp)         data parallel; FSDP ranks take batch too
length     –               sequence             the ring axis shards the sequence
embed      fsdp            –                    FSDP: params split on d, gathered per layer
heads      tensor          tensor               Megatron-style head parallelism
kv_heads   tensor          tensor               only the kv heads exist (GQA never repeats)
head_dim   –               –
mlp        tensor          tensor               column/row-parallel MLP
vocab      tensor          tensor               vocab-parallel embedding, head and logits
layers     –               –                    scanned layer axis stays whole
lora_rank  –               –                    LoRA's r is tiny: A/B shard on their in/out axes
=========  ==============  ===================  =========================================

Activations do not shard ``embed`` over ``fsdp`` because ``batch`` already uses that axis.

Two rules keep the mapping honest:

- **Collisions raise.** A mesh axis used by two dimensions of one array is a `RulesError`.
- **Divisibility falls back to replication, by prefix.** When the shape is known, a
  dimension keeps the longest prefix of its mesh axes whose size product divides it; the
  remaining axes replicate that dimension. E.g. ``batch=1`` on ``data=1, fsdp=8`` gives
  ``batch`` no sharding (the 8 FSDP ranks then hold the same tokens), ``kv_heads=8`` on
  ``tensor=16`` replicates the kv heads. ``strict=True`` raises instead.

Both rules are implemented once, in `attention.axes.resolve` (below this package, so the model
and ring attention use the same resolver without importing the table). Parameters are sharded
from a parameter tree that carries its names (`param_shardings(model.abstract_params(cfg), mesh)`);
activations by the rules the caller installs around the traced model::

    with axis_rules(mesh):        # nn.logical_axis_rules(flax_rules(mesh))
        logits = model.Llama(cfg, mesh=mesh).apply({"params": params}, tokens)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attention.axes import Axes, Rules, RulesError, resolve, to_spec
from attention.axes import constrain as constrain  # re-exported: activations by the installed rules

# name,       params,     activations
RULES_TABLE: tuple[tuple[str, Axes, Axes], ...] = (
    ("batch", (), ("data", "fsdp")),
    ("length", (), ("sequence",)),
    ("embed", ("fsdp",), ()),
    ("heads", ("tensor",), ("tensor",)),
    ("kv_heads", ("tensor",), ("tensor",)),
    ("head_dim", (), ()),
    ("mlp", ("tensor",), ("tensor",)),
    ("vocab", ("tensor",), ("tensor",)),
    ("layers", (), ()),
    ("lora_rank", (), ()),
)
PARAM_RULES: dict[str, Axes] = {name: p for name, p, _ in RULES_TABLE}
ACTIVATION_RULES: dict[str, Axes] = {name: a for name, _, a in RULES_TABLE}


def _axis_sizes(mesh: Mesh | Mapping[str, int] | None) -> dict[str, int] | None:
    if mesh is None:
        return None
    return dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, Mapping) else dict(mesh)


def flax_rules(mesh: Mesh | Mapping[str, int] | None = None, rules: Rules = ACTIVATION_RULES) -> tuple:
    """``rules`` as Flax's logical-axis rules list ``((name, mesh axes or None), ...)``.

    With ``mesh``, axes it lacks are dropped. Install it with ``nn.logical_axis_rules`` (or use
    `axis_rules`); the model and ring attention resolve it with the table's collision and
    divisibility rules (`attention.axes`).
    """
    sizes = _axis_sizes(mesh)
    out = []
    for name, axes in rules.items():
        kept = tuple(a for a in axes if sizes is None or a in sizes)
        out.append((name, kept or None))
    return tuple(out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh | Mapping[str, int] | None = None) -> Iterator[None]:
    """Install the activation rules for ``mesh`` while tracing the model (a context manager or decorator).

    ``with axis_rules(mesh): model.apply(...)`` — or ``@axis_rules(mesh)`` on the function that
    ``jax.jit`` traces. The model and ring attention read these rules; given a mesh without them
    installed they raise `RulesError`. ``mesh=None`` installs the table unfiltered (a model
    without a mesh never reads it), so callers need no branch.
    """
    with nn.logical_axis_rules(flax_rules(mesh)):
        yield


def logical_to_axes(
    names: Sequence[str | None],
    rules: Rules = ACTIVATION_RULES,
    mesh: Mesh | Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
    *,
    strict: bool = False,
) -> tuple[Axes, ...]:
    """Mesh axes per dimension (a tuple of tuples); the core of `logical_to_spec`.

    Args:
        names: one logical name (or None: replicated) per dimension.
        rules: name → mesh axes, e.g. `PARAM_RULES` or `ACTIVATION_RULES`.
        mesh: a `Mesh` or ``{axis: size}``; axes it lacks are dropped. Needed for ``shape``.
        shape: the array shape; enables the divisibility rule (module docstring).
        strict: raise instead of replicating a dimension its axes do not divide.
    """
    return resolve(names, rules, _axis_sizes(mesh), shape, strict=strict)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules = ACTIVATION_RULES,
    mesh: Mesh | Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
    *,
    strict: bool = False,
) -> P:
    """A `PartitionSpec` for logical ``names`` (see `logical_to_axes` for the arguments).

    >>> logical_to_spec(("batch", "length", "embed"))
    P(('data', 'fsdp'), 'sequence', None)
    """
    return to_spec(logical_to_axes(names, rules, mesh, shape, strict=strict))


def local_shape(
    names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh | Mapping[str, int]
) -> tuple[int, ...]:
    """The per-device shard shape of a ``shape`` array with logical ``names`` (the planner's unit)."""
    sizes = _axis_sizes(mesh)
    axes = logical_to_axes(names, rules, sizes, shape)
    return tuple(n // math.prod(sizes[a] for a in ax) for n, ax in zip(shape, axes, strict=True))


def _named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def _is_boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def param_names_and_shapes(params: Any, names: Any = None) -> tuple[Any, Any]:
    """``(names tree, shapes tree)`` of a parameter tree, both shaped like the unboxed params.

    Args:
        params: boxed leaves (``nn.LogicallyPartitioned``: `model.abstract_params(cfg, lora)` or
            params from ``init`` before unboxing), or plain arrays / ``jax.ShapeDtypeStruct`` with ``names``.
        names: for plain leaves, the matching tree of logical-name tuples (`model.logical_axes`).
    """
    if names is None:
        leaves = jax.tree.leaves(params, is_leaf=_is_boxed)
        if not leaves or not all(_is_boxed(x) for x in leaves):
            raise RulesError(
                "the parameter tree carries no logical axis names: pass model.abstract_params(cfg, lora) "
                "(boxed leaves) or names=model.logical_axes(cfg, lora)."
            )
        names = jax.tree.map(lambda b: tuple(b.names), params, is_leaf=_is_boxed)
        return names, jax.tree.map(lambda b: tuple(b.value.shape), params, is_leaf=_is_boxed)
    plain = nn.meta.unbox(params)
    if jax.tree.structure(names, is_leaf=_is_names) != jax.tree.structure(plain):
        raise RulesError(
            "names does not match the parameter tree: build both from the same config and LoRA "
            "(model.logical_axes(cfg, lora))."
        )
    shapes = jax.tree.map(lambda x: tuple(jnp.shape(x)), plain)
    return names, shapes


def param_shardings(
    params: Any, mesh: Mesh, *, names: Any = None, rules: Rules = PARAM_RULES, strict: bool = False
) -> Any:
    """A tree of `NamedSharding` for a parameter tree, by the rules table's parameter column.

    Use it as ``init_params(cfg, key, out_shardings=param_shardings(model.abstract_params(cfg), mesh))``
    so no full-size parameter ever lands on one device.

    Args:
        params: `model.abstract_params(cfg, lora)` (boxed: the names ride along), or real /
            abstract params with ``names``; the result is shaped like the unboxed tree.
        mesh: the device mesh.
        names: logical-name tuples matching unboxed ``params`` (`model.logical_axes(cfg, lora)`).
        rules, strict: as for `logical_to_spec`.
    """
    names, shapes = param_names_and_shapes(params, names)
    return jax.tree.map(
        lambda n, s: _named(mesh, logical_to_spec(n, rules, mesh, s, strict=strict)), names, shapes, is_leaf=_is_names
    )


def shard_params(params: Any, mesh: Mesh, names: Any) -> Any:
    """Place an existing (host or single-device) parameter tree onto ``mesh`` by the rules table.

    ``names``: the tree of logical-name tuples matching ``params`` (`model.logical_axes(cfg, lora)`).
    """
    return jax.device_put(params, param_shardings(params, mesh, names=names))


def batch_sharding(mesh: Mesh, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of token-like arrays ``[b, t]`` (tokens, targets, positions, segment ids).

    ``P(("data", "fsdp"), "sequence")``; with ``shape`` the divisibility rule applies.
    """
    return _named(mesh, logical_to_spec(("batch", "length"), ACTIVATION_RULES, mesh, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, step counters, RNG keys)."""
    return _named(mesh, P())


def _path_keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def opt_state_shardings(opt_state: Any, params_shardings: Any, params_like: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state tree: each moment shares its parameter's sharding.

    optax states hold parameter-shaped trees (``ScaleByAdamState.mu`` / ``nu`` …) whose key
    paths end with the parameter's own path; a state leaf whose path ends with a parameter's
    path and whose shape equals that parameter's gets the parameter's sharding. Everything
    else (step counters, schedule state) is replicated.

    Args:
        opt_state: the optax state, concrete or abstract (``jax.eval_shape(opt.init, params)``).
        params_shardings: tree of `NamedSharding` matching the params (`param_shardings`).
        params_like: the params (or `jax.ShapeDtypeStruct` tree) giving each parameter's shape.
        mesh: the mesh (for the replicated leaves).
    """
    flat_sh = jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    flat_p = jax.tree_util.tree_flatten_with_path(params_like)[0]
    by_path = {_path_keys(p): (s, tuple(x.shape)) for (p, s), (_, x) in zip(flat_sh, flat_p, strict=True)}
    lengths = sorted({len(k) for k in by_path}, reverse=True)
    rep = replicated(mesh)

    def pick(path, leaf):
        keys = _path_keys(path)
        for n in lengths:
            hit = by_path.get(keys[-n:]) if n <= len(keys) else None
            if hit is not None and hit[1] == tuple(jnp.shape(leaf)):
                return hit[0]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_state)
