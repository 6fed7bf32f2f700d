"""The one config library: every config dataclass is read, checked, written and documented here.

Configs are frozen stdlib dataclasses (hashable: `LlamaConfig` is a jit static argument and a
cache key) documented by attribute docstrings — the string literal under each field, the one
source of its help text. pydantic does the work:

    cfg = build(OptimConfig, {"lr": "1e-3"}, label="optim")   # → OptimConfig(lr=0.001, ...)
    to_dict(cfg)                                               # → plain JSON/YAML-ready dict
    help_lines(OptimConfig, "optim.")                          # → "optim.lr (float, default 0.0003): …"

`build` validates a plain mapping (YAML, JSON, a checkpoint's config) with `pydantic.TypeAdapter`:
lax coercion (``"1e-3"`` → float, ``"true"`` → bool, lists → tuples, mappings → nested dataclasses,
unknown keys rejected), then each dataclass's own ``__post_init__`` checks. Every failure becomes one
sentence naming the dotted field (``stages.1.optim.lr``). `help_lines` renders the JSON schema, whose
descriptions pydantic reads from those same attribute docstrings.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import BeforeValidator, TypeAdapter

T = TypeVar("T")

# extra="forbid": a misspelt key is an error, not silently ignored. Numbers coerce to str because
# YAML reads a stage named 65536 as an int. The config is attached to each class `build` sees first;
# nested dataclasses inherit it.
PYDANTIC_CONFIG = pydantic.ConfigDict(
    extra="forbid", use_attribute_docstrings=True, coerce_numbers_to_str=True, ser_json_inf_nan="constants"
)


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model or run; the message says what to fix."""


def _one_or_many(value: Any) -> Any:
    # `--set eval.passkey_lengths=256,512` and `sources: {kind: synthetic}` (one item without a list).
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value if isinstance(value, (list, tuple)) else [value]


Items = Annotated[tuple[T, ...], BeforeValidator(_one_or_many)]
"""A tuple field that also takes one item or comma-separated text."""


@functools.cache
def adapter(cls: type) -> TypeAdapter:
    """The cached pydantic validator/serialiser for dataclass ``cls``."""
    if "__pydantic_config__" not in vars(cls):
        cls.__pydantic_config__ = PYDANTIC_CONFIG  # TypeAdapter takes no config for dataclasses
    return TypeAdapter(cls)


def build(
    cls: type[T],
    raw: Any,
    where: str = "",
    *,
    label: str | Mapping[type, str] = "config",
    error: type[ValueError] = ConfigError,
    brackets: bool = False,
) -> T:
    """An instance of dataclass ``cls`` from plain data, or one ``error`` sentence naming the field.

    Args:
        cls: the (frozen) dataclass.
        raw: a mapping of its fields (nested mappings for nested dataclasses).
        where: dotted path of ``raw`` in the whole config (``stages.1.optim``), prefixed to every path.
        label: the words in "unknown <label> field ..." (``""``: "unknown field ..."), or one per
            dataclass for unknown fields of nested dataclasses (``{RopeConfig: "rope", ...}``).
        error: the exception class raised for type and unknown-field errors.
        brackets: write list indices as ``sources[0]`` instead of ``sources.0``.

    A ``__post_init__`` check that raises `ConfigError` or ``error`` keeps its own sentence; another
    ``ValueError`` (e.g. a `DataError` inside a run config) gets the field's path in front.
    """
    try:
        return adapter(cls).validate_python(raw)
    except pydantic.ValidationError as exc:
        raise _sentence(cls, exc.errors(include_url=False), where, label, error, brackets) from None


def to_dict(obj: Any) -> Any:
    """A JSON/YAML-ready view of a config dataclass (tuples → lists); `build` reads it back."""
    return adapter(type(obj)).dump_python(obj, mode="json")


# ------------------------------------------------------------------------------------ errors
def _path(where: str, loc: tuple, brackets: bool) -> str:
    out = where
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]" if brackets else (f".{part}" if out else str(part))
        else:
            out += f".{part}" if out else str(part)
    return out


def _sentence(cls: type, errors: list[dict], where: str, label: Any, error: type, brackets: bool) -> Exception:
    extra = [e for e in errors if e["type"] in ("unexpected_keyword_argument", "extra_forbidden")]
    if extra:
        owner = _strip(_annotation_at(cls, extra[0]["loc"][:-1]))
        if isinstance(label, Mapping):
            label = label.get(owner, "config")
        words = f"unknown {label} field" if label else "unknown field"
        known = ", ".join(f.name for f in dataclasses.fields(owner)) if dataclasses.is_dataclass(owner) else "?"
        paths = ", ".join(_path(where, e["loc"], brackets) for e in extra)
        return error(f"{words} {paths}: remove it or use one of {known}.")
    first = errors[0]
    loc, path = first["loc"], _path(where, first["loc"], brackets)
    if first["type"] in ("value_error", "assertion_error"):
        cause = first["ctx"]["error"]
        if isinstance(cause, (ConfigError, error)):
            return cause
        return error(f"{path}: {cause}")
    if first["type"] == "missing":
        parent = _path(where, loc[:-1], brackets) or "the config"
        return error(f"{parent} is incomplete (missing {path}): add the missing field.")
    tp, value = _strip(_annotation_at(cls, loc)), first["input"]
    if dataclasses.is_dataclass(tp):
        return error(f"{path or 'the config'} must be a mapping of {tp.__name__} fields, got {value!r}.")
    name = type_name(_annotation_at(cls, loc))
    return error(f"{path} must be {'an' if name[0] in 'aeiou' else 'a'} {name}, got {value!r} (wrong type).")


def _strip(tp: Any) -> Any:
    """``X`` for ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _annotation_at(cls: type, loc: tuple) -> Any:
    """The annotation of the field at ``loc`` (field names and list indices) below ``cls``."""
    tp: Any = cls
    for part in loc:
        tp = _strip(tp)
        if isinstance(part, int) and typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        elif dataclasses.is_dataclass(tp) and isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part, Any)
        else:
            return Any
    return tp


def type_name(tp: Any) -> str:
    """A short human name for an annotation (``int``, ``float | None``, ``list of int``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if tp is dict or typing.get_origin(tp) is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


# -------------------------------------------------------------------------------------- help
_JSON_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "object": "mapping"}


def help_lines(cls: type, prefix: str = "") -> Iterator[str]:
    """One ``name (type, default X): help`` line per field of ``cls``, nested dataclasses recursed.

    A nested dataclass gives a ``name: help`` line and then its fields as ``name.field``; a list of
    dataclasses its fields as ``name.N.field``. Generated from the pydantic JSON schema.
    """
    schema = adapter(cls).json_schema()
    yield from _field_lines(schema, schema.get("$defs", {}), prefix)


def _field_lines(node: dict, defs: dict, prefix: str) -> Iterator[str]:
    required = node.get("required", ())
    for name, prop in node.get("properties", {}).items():
        path, text = prefix + name, " ".join(prop.get("description", "").split())
        section = _section(prop, defs)
        items = prop.get("items") or {}
        if section is not None:
            yield f"{path}: {text}"
            yield from _field_lines(section, defs, path + ".")
        elif prop.get("type") == "array" and _section(items, defs) is not None:
            yield f"{path}: {text} (a list; index items as {path}.0, {path}.1, …)"
            yield from _field_lines(_section(items, defs), defs, path + ".N.")
        else:
            kind = _json_type(prop, defs)
            if name in required:
                kind += ", required"
            elif "default" in prop:  # (a default_factory's value is not in the schema)
                kind += f", default {prop['default']!r}"
            yield f"{path} ({kind}): {text}"


def _section(prop: dict, defs: dict) -> dict | None:
    """The schema of the dataclass a property holds (also through ``X | None``), else None."""
    options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
    if len(options) == 1 and "$ref" in options[0]:
        return defs[options[0]["$ref"].rsplit("/", 1)[-1]]
    return None


def _json_type(prop: dict, defs: dict) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in prop:
        return " | ".join("None" if o.get("type") == "null" else _json_type(o, defs) for o in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_json_type(prop['items'], defs)}" if prop.get("items") else "list"
    return _JSON_TYPES.get(prop.get("type"), "value")
