"""Typed dataclass ⇄ dict plumbing for run configs: coercion, dotted overrides, field help.

A run config is plain YAML. `build` turns a dict into a (nested, frozen) dataclass, coercing
each value to the field's annotated type (``"1e-3"`` → float, ``"true"`` → bool, lists →
tuples, dicts → nested dataclasses) and naming the dotted path of any unknown or ill-typed
field. `apply_override` edits the raw dict for ``--set a.b.0.c=value`` before that happens, so
an override goes through exactly the same checks as the YAML it replaces. `field_help` walks
the dataclasses and yields one line per field from ``field(metadata={"help": ...})``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

import yaml

from model.config import ConfigError


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a help text (shown by ``python -m train --help``)."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": text})
    return dataclasses.field(default=default, metadata={"help": text})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None`` / ``Optional[X]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
    return False, tp


def type_name(tp: Any) -> str:
    """A short human name for an annotation (``int``, ``float | None``, ``list of StageConfig``)."""
    optional, inner = _is_optional(tp)
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        name = f"list of {type_name(args[0])}" if args else "list"
    elif origin is dict or inner is dict:
        name = "mapping"
    elif origin in (typing.Union, types.UnionType):
        name = " | ".join(type_name(a) for a in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if optional else name


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to annotation ``tp``; a `ConfigError` naming ``where`` if it cannot be."""
    optional, tp = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if optional or tp is Any:
            return None
        raise ConfigError(f"{where} cannot be empty: give a {type_name(tp)}.")
    origin = typing.get_origin(tp)
    try:
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping of {tp.__name__} fields, got {value!r}.")
            return build(tp, value, where)
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(tp):
                try:
                    return coerce(value, arg, where)
                except (ConfigError, TypeError, ValueError):
                    continue
            raise ConfigError(f"{where} must be a {type_name(tp)}, got {value!r}.")
        if origin in (tuple, list):
            if isinstance(value, str):
                value = [v for v in (p.strip() for p in value.split(",")) if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            item = args[0] if args else Any
            return tuple(coerce(v, item, f"{where}.{i}") for i, v in enumerate(value))
        if tp is dict or origin is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a mapping, got {value!r}.")
            return dict(value)
        if tp is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                text = value.replace("_", "").strip()
                f = float(text)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value) if isinstance(value, int) else _raise()
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{where} must be a {type_name(tp)}, got {value!r}.") from None
    return value


def _raise():
    raise ValueError


def build(cls: type, data: dict[str, Any], where: str) -> Any:
    """An instance of dataclass ``cls`` from ``data`` (coerced; unknown keys name their path).

    Classes with their own ``from_dict`` (other packages' configs) get the coerced dict through it,
    so their own validation runs too.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}.")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        path = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ConfigError(f"unknown config field {path}: remove it or use one of {', '.join(sorted(fields))}.")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        if hasattr(cls, "from_dict"):  # another package's config: let its own validation run on plain data
            return cls.from_dict(to_dict(kwargs))
        return cls(**kwargs)
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"{where or 'the config'} is incomplete ({exc}): add the missing field.") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError) or not where:
            raise
        raise ConfigError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """A YAML/JSON-ready view of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_value(text: str) -> Any:
    """An override's value: YAML scalars/lists/mappings (``[256, 512]``, ``null``, ``{a: 1}``) or the text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.0.c=value`` to the raw config dict in place (list items by index)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r} is not key=value: write e.g. --set optim.lr=1e-3.")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        path = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {path} indexes a list of {len(node)} items; use 0..{len(node) - 1}.")
            node = node[int(part)]
        else:
            child = node.get(part)
            if not isinstance(child, (dict, list)):
                child = {} if child is None else _raise_not_mapping(key, path, child)
                node[part] = child
            node = child
    last = parts[-1]
    value = parse_value(text)
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: the list has {len(node)} items; use an index 0..{len(node) - 1}.")
        node[int(last)] = value
    else:
        node[last] = value


def _raise_not_mapping(key: str, path: str, value: Any):
    raise ConfigError(f"--set {key}: {path} is {value!r}, not a mapping, so it has no sub-fields.")


def field_help(cls: type, prefix: str = "", extra: dict[type, dict[str, str]] | None = None) -> Iterator[str]:
    """One ``name (type, default): help`` line per field, recursing into nested dataclasses."""
    extra = extra or {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        text = f.metadata.get("help") or extra.get(cls, {}).get(f.name) or docstring_attributes(cls).get(f.name, "")
        if dataclasses.is_dataclass(inner):
            yield f"{name}: {text}" if text else f"{name}:"
            yield from field_help(inner, name + ".", extra)
            continue
        args = [a for a in typing.get_args(inner) if a is not Ellipsis]
        if typing.get_origin(inner) in (tuple, list) and args and dataclasses.is_dataclass(args[0]):
            yield f"{name}: {text} (a list; index items as {name}.0, {name}.1, …)"
            yield from field_help(args[0], name + ".N.", extra)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = to_dict(f.default_factory())
        else:
            default = "required"
        yield f"{name} ({type_name(tp)}, default {default!r}): {text}".rstrip(": ")


def docstring_attributes(cls: type) -> dict[str, str]:
    """Field docs from a Google-style ``Attributes:`` section (``name: text``, ``a, b: text``)."""
    lines = (cls.__doc__ or "").splitlines()
    out: dict[str, str] = {}
    inside, current, indent = False, [], None
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            continue
        lead = len(line) - len(line.lstrip())
        if indent is None:
            indent = lead
        if lead < indent:
            break
        if lead == indent and ":" in stripped:
            names, _, text = stripped.partition(":")
            current = [n.strip() for n in names.split(",")]
            for n in current:
                out[n] = text.strip()
        elif current:
            for n in current:
                out[n] = (out[n] + " " + stripped).strip()
    return out
