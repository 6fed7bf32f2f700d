"""ringllama checkpoints (orbax params + config JSON) and `load_model`, which opens any supported directory.

Layout of a ringllama checkpoint directory::

    ringllama_config.json   LlamaConfig.to_dict()
    params/                 orbax StandardCheckpointer tree (the parameter pytree)
    tokenizer.json, ...     tokenizer / generation files copied from the source, when it had them

Restores go against an abstract target (`jax.ShapeDtypeStruct` per leaf, with a sharding when
one is given) built from the config and checked against the checkpoint's own metadata, because
orbax quietly restores the stored shape when a target shape disagrees.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from convert.atomic import staged_directory
from convert.hf import copy_side_files, load_hf
from convert.meta import is_meta_checkpoint, load_meta
from convert.names import ConversionError
from convert.safetensors_io import INDEX_FILE, SINGLE_FILE
from convert.tree import check_params, flatten, place, relayout, set_path
from model.config import ConfigError, LlamaConfig

CONFIG_FILE = "ringllama_config.json"
PARAMS_DIR = "params"
LORA_CONFIG_FILE = "lora_config.json"  # beside the config in a LoRA checkpoint (`convert.peft`)
Params = dict[str, Any]


def is_ringllama_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a directory written by `save_checkpoint`."""
    return (Path(path) / CONFIG_FILE).is_file()


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an HF ``config.json`` plus safetensors weights."""
    p = Path(path)
    return (p / "config.json").is_file() and ((p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file())


def _dtype_name(leaf: Any) -> str:
    return np.dtype(leaf.dtype).name


def _saver(params: Params):
    """A synchronous orbax checkpointer and its save args for ``params``.

    For an all-numpy tree (what the converters produce) orbax's default `NumpyHandler` would
    deep-copy every array first — a second full copy of the model — so that an async save may
    outlive the caller's arrays. This save is synchronous, so a handler without the copy is used,
    and without zstd compression, which holds the compressed arrays in memory until the write
    (~0.8x the model on random bf16) to save ~20% of disk. The files are the `StandardSave`
    layout and restore with `StandardRestore`.
    """
    if all(isinstance(leaf, np.ndarray) for _, leaf in flatten(params)):
        th = ocp.type_handlers
        registry = th.create_type_handler_registry((np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)))
        handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
        return ocp.Checkpointer(handler), ocp.args.PyTreeSave(params)
    return ocp.Checkpointer(ocp.StandardCheckpointHandler()), ocp.args.StandardSave(params)


def save_checkpoint(
    path: str | os.PathLike, config: LlamaConfig, params: Params, *, side_files_from: str | os.PathLike | None = None
) -> Path:
    """Write ``params`` (numpy or jax arrays, possibly sharded) and ``config`` as a new checkpoint.

    The directory is staged beside ``path`` and renamed into place once orbax has finished, so
    an interrupted save leaves nothing at ``path``. ``config.param_dtype`` is set to the dtype the
    params actually have. Returns the checkpoint path.
    """
    check_params(params, config, "the parameters to save")
    config = config.replace(param_dtype=_dtype_name(params["embed_tokens"]["embedding"]))
    with staged_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        checkpointer, args = _saver(params)
        try:
            checkpointer.save(tmp / PARAMS_DIR, args=args)
        finally:
            checkpointer.close()
    return Path(path)


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` stored in a ringllama checkpoint."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ConversionError(f"no {CONFIG_FILE} in {path}: it is not a ringllama checkpoint directory.")
    try:
        return LlamaConfig.from_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno}): fix or replace it.") from exc
    except TypeError as exc:
        raise ConfigError(f"{file} does not describe a LlamaConfig ({exc}): fix or replace it.") from exc


def _restore_error(root: Path, exc: Exception) -> ConversionError:
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return ConversionError(
        f"cannot restore the orbax parameters in {root / PARAMS_DIR} ({type(exc).__name__}: {first}): "
        "the checkpoint is incomplete or corrupt."
    )


def _restore_host(root: Path, stored: Params, dtype: str | None) -> Params:
    """Restore to numpy one leaf at a time.

    A whole-tree restore reads every leaf concurrently, each through its own temporary buffer
    (~30% of the model on top of the result); one leaf at a time bounds the extra to one leaf.
    """
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    params: Params = {}
    try:
        for p, meta in flatten(stored):
            leaf_dtype = np.dtype(dtype) if dtype else meta.dtype
            target: Params = {}
            set_path(target, p, jax.ShapeDtypeStruct(tuple(meta.shape), leaf_dtype))
            args: Params = {}
            set_path(args, p, ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf_dtype))
            try:
                out = checkpointer.restore(
                    root / PARAMS_DIR, args=ocp.args.PyTreeRestore(target, restore_args=args, partial_restore=True)
                )
            except Exception as exc:  # tensorstore / orbax errors for damaged array files
                raise _restore_error(root, exc) from exc
            for key in p:
                out = out[key]
            set_path(params, p, out)
    finally:
        checkpointer.close()
    return params


def load_checkpoint(
    path: str | os.PathLike, mesh_shardings: Any = None, *, dtype: str | None = None
) -> tuple[LlamaConfig, Params]:
    """Restore a ringllama checkpoint against an abstract target built from its config.

    Args:
      path: a directory written by `save_checkpoint`.
      mesh_shardings: None for host numpy arrays; a `jax.sharding.Sharding` for every leaf, or a
        tree of them matching the params, to restore each leaf straight into that sharding
        (no full-size array lands on one device).
      dtype: cast to this dtype on restore; None keeps the stored one.

    Returns:
      ``(config, params)`` with ``config.param_dtype`` equal to the restored dtype.
    """
    root = Path(path).absolute()
    cfg = read_config(root)
    if not (root / PARAMS_DIR).is_dir():
        raise ConversionError(f"{root} has no {PARAMS_DIR}/ directory: the checkpoint is incomplete.")
    checkpointer = ocp.StandardCheckpointer()
    try:
        try:
            stored = checkpointer.metadata(root / PARAMS_DIR).item_metadata.tree
        except Exception as exc:  # orbax raises many types for a missing or damaged directory
            raise ConversionError(
                f"cannot read the orbax parameters in {root / PARAMS_DIR} ({type(exc).__name__}): "
                "the checkpoint is incomplete or corrupt."
            ) from exc
        # orbax would quietly restore the stored shapes over a disagreeing target: check first.
        check_params(stored, cfg, f"the parameters in {root}")
        if mesh_shardings is None:
            params = _restore_host(root, stored, dtype)
        else:
            if isinstance(mesh_shardings, jax.sharding.Sharding):
                sharding_of = lambda p: mesh_shardings
            else:
                table = dict(flatten(mesh_shardings))
                sharding_of = lambda p: table[p]
            target: Params = {}
            for p, meta in flatten(stored):
                leaf_dtype = np.dtype(dtype) if dtype else meta.dtype
                set_path(target, p, jax.ShapeDtypeStruct(tuple(meta.shape), leaf_dtype, sharding=sharding_of(p)))
            try:
                params = checkpointer.restore(root / PARAMS_DIR, target)
            except Exception as exc:
                raise _restore_error(root, exc) from exc
    finally:
        checkpointer.close()
    return cfg.replace(param_dtype=_dtype_name(params["embed_tokens"]["embedding"])), params


def load_model(
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    scan_layers: bool | None = None,
    mesh_shardings: Any = None,
    progress: bool | None = None,
) -> tuple[LlamaConfig, Params]:
    """Open a ringllama checkpoint, a Hugging Face directory or a Meta ``consolidated.*.pth`` directory.

    Args:
      path: the directory; its kind is recognised from its files.
      dtype: parameter dtype to load as (None keeps the stored one).
      scan_layers: layout of the returned params (None: the checkpoint's own; stacked for HF/Meta).
      mesh_shardings: as in `load_checkpoint` (None gives host numpy arrays).
      progress: tqdm bar for HF/Meta reads (None: only on a terminal).

    Returns:
      ``(config, params)``.
    """
    p = Path(path)
    if (p / LORA_CONFIG_FILE).is_file():  # its base kernels without the adapters are neither model
        raise ConversionError(
            f"{p} is a LoRA checkpoint (base + adapters): load <run_dir>/final (merged), or merge it with "
            "'python -m convert flax-to-hf SRC DST --merge-lora'."
        )
    if is_ringllama_checkpoint(p):
        stored = read_config(p)
        if scan_layers is None or scan_layers == stored.scan_layers:
            return load_checkpoint(p, mesh_shardings, dtype=dtype)
        cfg, params = load_checkpoint(p, None, dtype=dtype)
        cfg, params = relayout(params, cfg, scan_layers)
    elif is_hf_checkpoint(p):
        cfg, params = load_hf(p, dtype, scan_layers=True if scan_layers is None else scan_layers, progress=progress)
    elif is_meta_checkpoint(p):
        cfg, params = load_meta(p, dtype, scan_layers=True if scan_layers is None else scan_layers, progress=progress)
    else:
        raise ConversionError(
            f"{p} is neither a ringllama checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/), a Hugging Face model "
            "directory (config.json + safetensors) nor a Meta checkpoint (params.json + consolidated.*.pth)."
        )
    if mesh_shardings is not None:
        params = place(params, mesh_shardings)
    return cfg, params
