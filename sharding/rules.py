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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Axes = tuple[str, ...]
Rules = Mapping[str, Axes]

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


class RulesError(ValueError):
    """Logical names that cannot be mapped onto the mesh; the message says what to change."""


def _axis_sizes(mesh: Mesh | Mapping[str, int] | None) -> dict[str, int] | None:
    if mesh is None:
        return None
    return dict(mesh.shape) if hasattr(mesh, "shape") and not isinstance(mesh, Mapping) else dict(mesh)


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
    sizes = _axis_sizes(mesh)
    if shape is not None and len(shape) != len(names):
        raise RulesError(f"logical names {tuple(names)} do not match an array of rank {len(shape)} (shape {shape}).")
    out: list[Axes] = []
    used: dict[str, str | None] = {}
    for dim, name in enumerate(names):
        if name is None:
            out.append(())
            continue
        if name not in rules:
            raise RulesError(f"no sharding rule for logical axis {name!r}: add it to sharding.rules.RULES_TABLE.")
        axes = tuple(a for a in rules[name] if sizes is None or a in sizes)
        for a in axes:
            if a in used:
                raise RulesError(
                    f"mesh axis {a!r} would shard both {used[a]!r} and {name!r} of {tuple(names)}: "
                    "one mesh axis can split only one dimension; change the rules."
                )
            used[a] = name
        if shape is not None and sizes is not None:
            kept: Axes = ()
            for i in range(len(axes), -1, -1):
                if shape[dim] % math.prod(sizes[a] for a in axes[:i]) == 0:
                    kept = axes[:i]
                    break
            if strict and kept != axes:
                split = math.prod(sizes[a] for a in axes)
                raise RulesError(
                    f"dimension {dim} ({name!r}, size {shape[dim]}) is not divisible by mesh axes {axes} "
                    f"(size {split}): pick mesh sizes that divide it."
                )
            axes = kept
        out.append(axes)
    return tuple(out)


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
    axes = logical_to_axes(names, rules, mesh, shape, strict=strict)
    return P(*[None if not a else (a[0] if len(a) == 1 else a) for a in axes])


def local_shape(
    names: Sequence[str | None], shape: Sequence[int], rules: Rules, mesh: Mesh | Mapping[str, int]
) -> tuple[int, ...]:
    """The per-device shard shape of a ``shape`` array with logical ``names`` (the planner's unit)."""
    sizes = _axis_sizes(mesh)
    axes = logical_to_axes(names, rules, sizes, shape)
    return tuple(n // math.prod(sizes[a] for a in ax) for n, ax in zip(shape, axes, strict=True))


def _named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def param_shardings(config, mesh: Mesh, rules: Rules = PARAM_RULES, *, strict: bool = False, lora: Any = None) -> Any:
    """A tree of `NamedSharding` matching `model.init_params(config, ...)`, from `model.logical_axes`.

    Use it as ``init_params(config, key, out_shardings=param_shardings(config, mesh))`` so no
    full-size parameter ever lands on one device. With ``lora`` the tree includes the adapters.
    """
    from model.params import abstract_params, logical_axes  # lazy: model.llama imports this module

    names = logical_axes(config, lora)
    shapes = jax.tree.map(lambda b: b.value.shape, abstract_params(config, lora), is_leaf=_is_boxed)
    return jax.tree.map(
        lambda n, s: _named(mesh, logical_to_spec(n, rules, mesh, s, strict=strict)),
        names,
        shapes,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(e, str) for e in x),
    )


def _is_boxed(x) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.LogicallyPartitioned)


def shard_params(params: Any, mesh: Mesh, config) -> Any:
    """Place an existing (host or single-device) parameter tree onto ``mesh`` by the rules table."""
    return jax.device_put(params, param_shardings(config, mesh))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh, rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """``with_sharding_constraint`` on ``x`` by logical ``names`` (activation rules by default).

    Never a silent no-op: without a mesh it raises (callers skip the call when they have none),
    and on the CPU mesh the constraint really reshards, so sharding bugs show up in tests.
    """
    if not isinstance(mesh, Mesh):
        raise RulesError(f"constrain needs a jax.sharding.Mesh, got {type(mesh).__name__}: build one with make_mesh.")
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
