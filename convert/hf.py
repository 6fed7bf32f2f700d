"""Hugging Face safetensors checkpoints ⇄ ringllama parameter trees, one tensor at a time.

`load_hf` reads ``config.json`` and a single-file or sharded checkpoint, checks every name and
shape from the headers before reading any data, then streams the tensors through the one name
map (`convert.names`) into a preallocated numpy tree: peak memory is the model in the output
dtype plus a tensor or two. `save_hf` does the reverse, writing each shard tensor by tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from convert import safetensors_io as st
from convert.atomic import staged_directory
from convert.names import (
    ConversionError,
    empty_params,
    expected_tensors,
    flax_to_hf,
    get_param,
    hf_to_flax,
    is_ignored,
    set_param,
)
from convert.tree import check_params
from model.config import DTYPES, LlamaConfig

Params = dict[str, Any]

# Files that travel with the weights (tokenizer, chat template, generation defaults).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def check_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is one a checkpoint can hold, else a `ConversionError` naming the choices."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return dtype


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer / generation files that exist in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _plural(names: list[str]) -> str:
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def load_hf(
    path: str | os.PathLike, dtype: str | None = None, *, scan_layers: bool = True, progress: bool | None = None
) -> tuple[LlamaConfig, Params]:
    """Read a Hugging Face Llama checkpoint directory into ringllama host parameters.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards.
      dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps the dtype the embedding
        is stored in.
      scan_layers: stacked ``layers`` (``[L, ...]`` leaves) or per-layer ``layers_i`` subtrees.
      progress: show a tqdm bar (None: only when stderr is a terminal).

    Returns:
      ``(config, params)``: the config with ``param_dtype`` set to the loaded dtype, and a nested
      dict of numpy arrays (e.g. ``embed_tokens/embedding`` ``[v, d]``,
      ``layers/attn/q_proj/kernel`` ``[L, d, n, h]``). ``jax.device_put(params, shardings)`` or
      `convert.load_model` places them on devices.

    Legacy ``rotary_emb.inv_freq`` tensors are skipped. A tied model (``tie_word_embeddings``)
    needs no ``lm_head.weight``; if one is present anyway it must equal the embedding bit for bit
    (it is then dropped), otherwise the checkpoint is refused rather than silently mis-tied.

    Raises:
      ConfigError: missing / invalid ``config.json`` or a non-Llama architecture.
      ConversionError: missing, unexpected or misshapen tensors; unreadable safetensors files.
    """
    src = Path(path)
    if not src.is_dir():
        raise ConversionError(f"{src} is not a directory: point at a Hugging Face model directory.")
    check_dtype(dtype)
    cfg = LlamaConfig.from_hf(src, scan_layers=scan_layers)
    infos = st.list_tensors(src)
    expected = expected_tensors(cfg)
    spare_head = cfg.tie_word_embeddings and LM_HEAD in infos
    known = set(expected) | ({LM_HEAD} if spare_head else set())
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(n for n in infos if n not in known and not is_ignored(n))
    if missing:
        raise ConversionError(
            f"the checkpoint in {src} lacks {_plural(missing)}: it does not match its config.json "
            "(wrong num_hidden_layers / tie_word_embeddings?) or a shard is missing."
        )
    if unexpected:
        raise ConversionError(
            f"the checkpoint in {src} holds unexpected tensor {_plural(unexpected)}: "
            "it is not a plain LlamaForCausalLM checkpoint for this config.json."
        )
    for name, (rule, _) in expected.items():
        if infos[name].shape != rule.hf_shape(cfg):
            raise ConversionError(
                f"tensor {name} has shape {infos[name].shape} but config.json implies {rule.hf_shape(cfg)}: "
                "the checkpoint and its config disagree."
            )
    if spare_head and not st.arrays_equal(infos[LM_HEAD], infos[EMBED]):
        raise ConversionError(
            f"{src} has tie_word_embeddings=true but its lm_head.weight differs from the embedding: "
            "set tie_word_embeddings to false in config.json to keep the separate head."
        )

    dtype = dtype or infos[EMBED].dtype
    if dtype == "float64":
        dtype = "float32"
    cfg = cfg.replace(param_dtype=dtype)
    params = empty_params(cfg, np.dtype(dtype))
    wanted = [infos[name] for name in expected]
    with tqdm(total=len(wanted), desc="reading tensors", unit="tensor", disable=_no_bar(progress)) as bar:
        for info, array in st.read_tensors(wanted):
            rule, layer = expected[info.name]
            set_param(params, rule, layer, cfg, hf_to_flax(info.name, array, rule, cfg))
            del array  # drop the raw tensor before the next one is read
            bar.update()
    return cfg, params


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _write_order(cfg: LlamaConfig) -> list[str]:
    """HF names layer by layer (embedding first, final norm and head last), for local reads."""
    expected = expected_tensors(cfg)

    def group(name: str) -> int:
        layer = expected[name][1]
        return -1 if name == EMBED else (cfg.num_layers if layer is None else layer)

    return sorted(expected, key=group)  # sorted() is stable: rule order within a layer


def hf_config_dict(cfg: LlamaConfig, dtype: str) -> dict[str, Any]:
    """``config.json`` for transformers: both rope layouts (`LlamaConfig.to_hf`) and the weight dtype."""
    out = cfg.to_hf()
    out["torch_dtype"] = dtype  # transformers v4 name
    out["dtype"] = dtype  # transformers v5 name
    return out


def save_hf(
    config: LlamaConfig,
    params: Params,
    path: str | os.PathLike,
    max_shard_size: str | int = "5GB",
    dtype: str | None = None,
    *,
    side_files_from: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[str]:
    """Write ringllama params as a Hugging Face ``LlamaForCausalLM`` directory.

    Args:
      config: the model config (its ``scan_layers`` says how ``params`` are laid out).
      params: numpy or jax arrays (sharded jax arrays are gathered one tensor at a time).
      path: the new directory; it must not exist. Everything is staged in a temporary sibling
        directory and renamed into place at the end, so a failure leaves nothing behind.
      max_shard_size: e.g. ``"5GB"``; past it the weights are split into
        ``model-0000k-of-0000N.safetensors`` files with a ``model.safetensors.index.json``.
      dtype: output dtype; None keeps the params' own (the embedding's dtype).
      side_files_from: a directory whose tokenizer / generation files are copied along.
      progress: show a tqdm bar (None: only when stderr is a terminal).

    Returns:
      The safetensors file names written. Tied models write no ``lm_head.weight``.
    """
    check_dtype(dtype)
    max_bytes = st.shard_bytes(max_shard_size)
    check_params(params, config, "the parameters to export")
    dtype = dtype or np.dtype(params["embed_tokens"]["embedding"].dtype).name
    check_dtype(dtype)
    config = config.replace(param_dtype=dtype)
    expected = expected_tensors(config)
    specs = [st.TensorSpec(n, expected[n][0].hf_shape(config), dtype) for n in _write_order(config)]
    shards = st.plan_shards(specs, max_bytes)
    files = st.shard_names(len(shards))

    def arrays(group: list[st.TensorSpec], bar) -> Iterable[np.ndarray]:
        for spec in group:
            rule, layer = expected[spec.name]
            value = np.asarray(get_param(params, rule, layer, config))
            yield flax_to_hf(spec.name, value, rule, config).astype(dtype, copy=False)
            bar.update()

    with staged_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(config, dtype), indent=2) + "\n")
        copied = copy_side_files(side_files_from, tmp) if side_files_from else []
        if "generation_config.json" not in copied:
            gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_id)}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        with tqdm(total=len(specs), desc="writing tensors", unit="tensor", disable=_no_bar(progress)) as bar:
            for file, group in zip(files, shards, strict=True):
                st.write_safetensors(tmp / file, group, arrays(group, bar), {"format": "pt"})
        if len(files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": {s.name: f for f, group in zip(files, shards, strict=True) for s in group},
            }
            (tmp / st.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files
