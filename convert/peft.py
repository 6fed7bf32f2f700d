"""LoRA checkpoints, merged export and Hugging Face PEFT adapter directories.

A ringllama **LoRA checkpoint** is an ordinary ringllama checkpoint of the base model (so every
loader still reads it as the base) plus two entries::

    lora_config.json   {"lora": LoraConfig.to_dict(), "base_model_name_or_path": ...}
    adapters/          orbax tree of the lora_a / lora_b leaves (and trained embeddings / norms)

`save_peft` writes what ``peft.PeftModel.from_pretrained(base, dir)`` loads:
``adapter_config.json`` (peft_type LORA, r, lora_alpha, target_modules, modules_to_save,
base_model_name_or_path) and ``adapter_model.safetensors`` whose keys are the HF names of the one
name map (`convert.names.RULES`) under ``base_model.model.``:

- ``…layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` = our ``A`` ``[in…, r]`` flattened and
  transposed, ``…lora_B.weight`` ``[out, r]`` from ``B`` ``[r, out…]`` (HF ``nn.Linear`` is ``[out, in]``;
  the head split flattens row-major on both sides, as `convert.names` does for the kernels);
- trained embeddings and norms as PEFT's ``modules_to_save``: PEFT (0.21) saves a wrapped module's
  copy under the module's own name (``base_model.model.model.embed_tokens.weight``,
  ``…layers.{i}.input_layernorm.weight``, ``…model.norm.weight``) and maps it back into
  ``modules_to_save.default`` on load, so those are the keys written here;
- a trained embedding of a tied model (``tie_word_embeddings``) is both the input embedding and the
  output head, but PEFT wraps ``embed_tokens`` in a copy that ``lm_head`` does not share: it is
  saved twice, as ``…model.embed_tokens.weight`` and ``…lm_head.weight`` (both in ``modules_to_save``,
  the keys PEFT 0.21 itself writes for a tied model), with ``ensure_weight_tying`` so that PEFT ties
  the two copies again on load (versions without that option ignore it, with a warning, and load
  two equal copies: the same logits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import save_file

from convert.atomic import staged_directory
from convert.checkpoint import CONFIG_FILE, LORA_CONFIG_FILE, PARAMS_DIR, _saver, load_checkpoint
from convert.names import ConversionError, expected_tensors, flax_to_hf, get_param
from convert.tree import check_params, flatten, set_path
from model import lora as lora_lib
from model.config import LlamaConfig

ADAPTERS_DIR = "adapters"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# modules_to_save names for the trained non-adapter leaves (PEFT matches them as name suffixes).
_SAVED_MODULES = {
    "embeddings": ["embed_tokens"],
    "norms": ["input_layernorm", "post_attention_layernorm", "model.norm"],
}
Params = dict[str, Any]


def is_lora_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ringllama checkpoint carrying LoRA adapters."""
    return (Path(path) / LORA_CONFIG_FILE).is_file()


def _host(tree: Params) -> Params:
    out: Params = {}
    for path, leaf in flatten(tree):
        set_path(out, path, np.asarray(leaf))
    return out


def save_lora_checkpoint(
    path: str | os.PathLike,
    config: LlamaConfig,
    lora: lora_lib.LoraConfig,
    params: Params,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the full adapted tree (base + adapters) as a LoRA checkpoint; staged, so all or nothing."""
    host = _host(params)
    base, adapters = _without_adapters(host), lora_lib.adapters(host)  # trained embeddings/norms stay in base
    check_params(base, config, "the base parameters to save")
    if not adapters:
        raise ConversionError(
            f"the parameters hold no LoRA adapters for targets {list(lora.targets)}: nothing to save."
        )
    config = config.replace(param_dtype=np.dtype(base["embed_tokens"]["embedding"].dtype).name)
    meta = {"lora": lora.to_dict(), "base_model_name_or_path": base_model_name_or_path}
    with staged_directory(path) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (tmp / LORA_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for sub, tree in ((PARAMS_DIR, base), (ADAPTERS_DIR, adapters)):
            checkpointer, args = _saver(tree)
            try:
                checkpointer.save(tmp / sub, args=args)
            finally:
                checkpointer.close()
    return Path(path)


def _without_adapters(tree: Params) -> Params:
    """``tree`` minus its lora_a / lora_b leaves."""
    out: Params = {}
    for path, leaf in flatten(tree):
        if path[-1] not in lora_lib.ADAPTER_LEAVES:
            set_path(out, path, leaf)
    return out


def read_lora_config(path: str | os.PathLike) -> tuple[lora_lib.LoraConfig, str | None]:
    """``(LoraConfig, base_model_name_or_path)`` of a LoRA checkpoint."""
    file = Path(path) / LORA_CONFIG_FILE
    try:
        meta = json.loads(file.read_text())
        return lora_lib.LoraConfig.from_dict(meta["lora"]), meta.get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"{file} is not a readable LoRA config ({type(exc).__name__}): fix or replace it."
        ) from exc


def load_lora_checkpoint(path: str | os.PathLike) -> tuple[LlamaConfig, lora_lib.LoraConfig, Params, str | None]:
    """``(config, lora, params with adapters, base_model_name_or_path)`` as host numpy arrays."""
    root = Path(path).absolute()
    if not is_lora_checkpoint(root):
        raise ConversionError(f"{root} has no {LORA_CONFIG_FILE}: it is not a LoRA checkpoint (train with lora:).")
    lora, base_name = read_lora_config(root)
    cfg, base = load_checkpoint(root)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    try:
        stored = checkpointer.metadata(root / ADAPTERS_DIR).item_metadata.tree
        target: Params = {}
        args: Params = {}
        for p, meta in flatten(stored):
            set_path(target, p, np.empty(tuple(meta.shape), meta.dtype))
            set_path(args, p, ocp.RestoreArgs(restore_type=np.ndarray))
        adapters = checkpointer.restore(root / ADAPTERS_DIR, args=ocp.args.PyTreeRestore(target, restore_args=args))
    except Exception as exc:  # orbax / tensorstore raise many types for damaged directories
        raise ConversionError(
            f"cannot restore the LoRA adapters in {root / ADAPTERS_DIR} ({type(exc).__name__}): the checkpoint is "
            "incomplete or corrupt."
        ) from exc
    finally:
        checkpointer.close()
    return cfg, lora, lora_lib.combine(base, _host(adapters)), base_name


def merge_numpy(params: Params, lora: lora_lib.LoraConfig, dtype: str | None = None) -> Params:
    """`model.lora.merge` on host arrays, one kernel at a time, in fp64 then cast (``dtype`` or the kernel's)."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        if "lora_a" in node:
            w, a, b = (np.asarray(node[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
            if a.ndim - 1 + b.ndim - 1 == w.ndim + 1:  # stacked layers
                ab = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
            else:
                ab = np.tensordot(a, b, axes=1)
            return {"kernel": (w + lora.scale * ab).astype(dtype or np.asarray(node["kernel"]).dtype)}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


# ------------------------------------------------------------------------------------ PEFT
def peft_config(lora: lora_lib.LoraConfig, base_model_name_or_path: str | None, cfg: LlamaConfig) -> dict[str, Any]:
    """The ``adapter_config.json`` dict for ``lora``."""
    tied_head = _tied_head(cfg, lora)
    saved = (_SAVED_MODULES["embeddings"] if lora.train_embeddings else []) + (
        _SAVED_MODULES["norms"] if lora.train_norms else []
    )
    saved += ["lm_head"] if tied_head else []
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": list(lora.modules),
        "modules_to_save": saved or None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # only when tied: PEFT versions without this option warn about every unknown key
        **({"ensure_weight_tying": True} if tied_head else {}),
    }


def _tied_head(cfg: LlamaConfig, lora: lora_lib.LoraConfig) -> bool:
    """Whether the trained embedding is also the output head, so the adapter must carry ``lm_head`` too."""
    return bool(cfg.tie_word_embeddings and lora.train_embeddings)


def peft_tensors(cfg: LlamaConfig, lora: lora_lib.LoraConfig, params: Params) -> dict[str, np.ndarray]:
    """PEFT state-dict keys → fp32 arrays for the adapters and trained leaves of ``params``."""
    out: dict[str, np.ndarray] = {}
    for name, (rule, layer) in expected_tensors(cfg).items():
        module = rule.path[-2]
        if rule.path[-1] == "kernel" and module in lora.modules:
            node = _layer_node(params, cfg, rule, layer)
            a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
            stem = PREFIX + name.removesuffix(".weight")
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)  # [r, in]
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)  # [out, r]
        elif lora_lib.is_trainable(rule.path, lora) and rule.path[-1] != "kernel":
            value = np.asarray(get_param(params, rule, layer, cfg), np.float32)
            out[PREFIX + name] = flax_to_hf(name, value, rule, cfg)
    if _tied_head(cfg, lora):  # HF's lm_head.weight [vocab, hidden] is the embedding itself
        out[PREFIX + "lm_head.weight"] = out[PREFIX + "model.embed_tokens.weight"].copy()
    return out


def _layer_node(params: Params, cfg: LlamaConfig, rule, layer: int | None) -> dict[str, np.ndarray]:
    """The ``{kernel, lora_a, lora_b}`` dict of one rule, sliced to ``layer`` when layers are stacked."""
    node = params["layers"] if cfg.scan_layers else params[f"layers_{layer}"]
    for key in rule.path[:-1]:
        node = node[key]
    if "lora_a" not in node:
        raise ConversionError(f"the parameters lack LoRA factors for {'/'.join(rule.path[:-1])}: check lora.targets.")
    return {k: (v[layer] if cfg.scan_layers else v) for k, v in node.items()}


def save_peft(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    lora: lora_lib.LoraConfig,
    params: Params,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT adapter directory for the adapted ``params`` (staged: all or nothing)."""
    tensors = peft_tensors(cfg, lora, _host(params))
    config = peft_config(lora, base_model_name_or_path, cfg)
    with staged_directory(path) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return Path(path)


__all__ = [
    "ADAPTERS_DIR",
    "LORA_CONFIG_FILE",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "is_lora_checkpoint",
    "load_lora_checkpoint",
    "merge_numpy",
    "peft_config",
    "peft_tensors",
    "read_lora_config",
    "save_lora_checkpoint",
    "save_peft",
]
