"""Logical axis names → mesh axes, under the rules the caller installs with Flax.

The one rules table lives in `sharding.rules`; the caller installs it for its mesh
(``with sharding.axis_rules(mesh):``, i.e. ``nn.logical_axis_rules(sharding.flax_rules(mesh))``)
around whatever traces the model. `attention` and `model` sit below `sharding` in the package
layering, so they never import the table: they read the installed rules here
(`installed_rules`) and resolve names with `resolve`, which `sharding.rules` also uses for its own
table, so parameters, activations and ring attention's ``shard_map`` specs follow one resolver:

- **Collisions raise.** A mesh axis used by two dimensions of one array is a `RulesError`.
- **Divisibility falls back to replication, by prefix.** When the shape is known, a dimension
  keeps the longest prefix of its mesh axes whose size product divides it; the remaining axes
  replicate that dimension (``strict=True`` raises instead).

Flax's own ``nn.logical_to_mesh_axes`` resolves the same rules list without the divisibility
fallback and silently replicates on collisions, which is why the model does not call it (nor
``nn.with_logical_constraint``, which is a no-op when no rules are installed). `constrain` raises
when no rules are installed: on the CPU mesh is where sharding bugs are caught.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Axes = tuple[str, ...]
Rules = Mapping[str, Axes]


class RulesError(ValueError):
    """Logical names that cannot be mapped onto the mesh; the message says what to change."""


def resolve(
    names: Sequence[str | None],
    rules: Rules,
    sizes: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
    *,
    strict: bool = False,
) -> tuple[Axes, ...]:
    """Mesh axes per dimension (a tuple of tuples) for logical ``names`` under ``rules``.

    Args:
        names: one logical name (or None: replicated) per dimension.
        rules: name → mesh axes (`sharding.rules.PARAM_RULES`, `installed_rules()`, ...).
        sizes: ``{mesh axis: size}``; axes it lacks are dropped. Needed for ``shape``.
        shape: the array shape; enables the divisibility rule (module docstring).
        strict: raise instead of replicating a dimension its axes do not divide.
    """
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


def to_spec(axes: Sequence[Axes]) -> P:
    """The `PartitionSpec` of per-dimension mesh axes (``()`` → None, one axis → its name)."""
    return P(*[None if not a else (a[0] if len(a) == 1 else tuple(a)) for a in axes])


def _as_axes(mesh_axes) -> Axes:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def installed_rules() -> dict[str, Axes]:
    """The logical-axis rules installed with ``nn.logical_axis_rules``, as ``{name: mesh axes}``.

    Raises `RulesError` when none are installed (sharding would otherwise silently not happen)
    or when a name is listed twice (Flax's priority fallbacks are not this project's rules).
    """
    pairs = nn.get_logical_axis_rules()
    if not pairs:
        raise RulesError(
            "no logical-axis rules are installed but a mesh was given: trace the model (or call ring "
            "attention) inside `with sharding.axis_rules(mesh):`."
        )
    rules: dict[str, Axes] = {}
    for name, mesh_axes in pairs:
        if name in rules:
            raise RulesError(f"the installed logical-axis rules list {name!r} twice: give each name one entry.")
        rules[name] = _as_axes(mesh_axes)
    return rules


def logical_spec(names: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    """The `PartitionSpec` of logical ``names`` under the installed rules, fitted to ``shape``.

    >>> with sharding.axis_rules(mesh):  # data=2, sequence=4
    ...     logical_spec(("batch", "length"), mesh, (2, 16))
    P(('data', 'fsdp'), 'sequence')
    """
    return to_spec(resolve(names, installed_rules(), dict(mesh.shape), shape))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh) -> jax.Array:
    """``with_sharding_constraint`` on ``x`` by logical ``names`` under the installed rules.

    Never a silent no-op: it raises without a `Mesh` or without installed rules, and on the CPU
    mesh the constraint really reshards, so sharding bugs show up in tests.

    Args:
        x: any array, e.g. activations ``[b, t, d]``.
        names: one logical name (or None) per dimension of ``x``, e.g. ``("batch", "length", "embed")``.
        mesh: the `jax.sharding.Mesh` the rules were installed for.
    """
    if not isinstance(mesh, Mesh):
        raise RulesError(f"constrain needs a jax.sharding.Mesh, got {type(mesh).__name__}: build one with make_mesh.")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_spec(names, mesh, x.shape)))
