"""Parameter-tree plumbing for the converters: flatten, check against a config, re-layout, place."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from convert.names import ConversionError, param_paths
from model.config import LlamaConfig

Path_ = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path_ = ()) -> Iterator[tuple[Path_, Any]]:
    """``(path, leaf)`` for every leaf of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from flatten(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def set_path(tree: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_params(params: Mapping[str, Any], cfg: LlamaConfig, what: str = "the parameters") -> None:
    """Raise `ConversionError` unless ``params`` has exactly the leaves and shapes ``cfg`` implies."""
    want = param_paths(cfg)
    have = {path: tuple(leaf.shape) for path, leaf in flatten(params)}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    layout = "stacked 'layers'" if cfg.scan_layers else "per-layer 'layers_i'"
    if missing:
        raise ConversionError(
            f"{what} lack {'/'.join(missing[0])} ({len(missing)} missing in all) for the {layout} layout "
            "their config describes: the checkpoint and its config disagree."
        )
    if unexpected:
        raise ConversionError(
            f"{what} hold {'/'.join(unexpected[0])} ({len(unexpected)} unexpected in all), which the config "
            f"({layout} layout, tie_word_embeddings={cfg.tie_word_embeddings}) has no place for."
        )
    for path, shape in want.items():
        if have[path] != shape:
            raise ConversionError(
                f"{what} have {'/'.join(path)} of shape {have[path]} but the config implies {shape}: "
                "the checkpoint and its config disagree."
            )


def relayout(params: dict[str, Any], cfg: LlamaConfig, scan_layers: bool) -> tuple[LlamaConfig, dict[str, Any]]:
    """Switch host (numpy) params between stacked ``layers`` and per-layer ``layers_i`` layouts.

    Works one leaf at a time and drops each source leaf as soon as it is copied, so the extra
    memory is one stacked leaf rather than a second copy of every layer.
    """
    if cfg.scan_layers == scan_layers:
        return cfg, params
    new_cfg = cfg.replace(scan_layers=scan_layers)
    out = {k: v for k, v in params.items() if k != "layers" and not k.startswith("layers_")}
    n = cfg.num_layers
    if scan_layers:
        for path, first in list(flatten(params["layers_0"])):
            stacked = np.empty((n, *first.shape), np.asarray(first).dtype)
            for i in range(n):
                node = params[f"layers_{i}"]
                for key in path[:-1]:
                    node = node[key]
                stacked[i] = np.asarray(node.pop(path[-1]))
            set_path(out, ("layers", *path), stacked)
    else:
        for path, leaf in list(flatten(params["layers"])):
            leaf = np.asarray(leaf)
            for i in range(n):
                set_path(out, (f"layers_{i}", *path), np.array(leaf[i]))
            del leaf
            node = params["layers"]
            for key in path[:-1]:
                node = node[key]
            del node[path[-1]]
    return new_cfg, out


def place(params: dict[str, Any], shardings: Any) -> dict[str, Any]:
    """Move host params onto devices leaf by leaf (each host copy is dropped once placed).

    ``shardings`` is one `jax.sharding.Sharding` for every leaf or a tree matching ``params``.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        lookup = lambda path: shardings
    else:
        table = dict(flatten(shardings))
        lookup = lambda path: table[path]
    out: dict[str, Any] = {}
    for path, leaf in list(flatten(params)):
        set_path(out, path, jax.device_put(leaf, lookup(path)))
        node = params
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]  # the caller's tree empties as ours fills: one copy at a time
    return out
