"""Hugging Face / Meta ⇄ ringllama weights and configs, streamed one tensor at a time.

    import convert

    cfg, params = convert.load_hf("Llama-3.2-1B")                  # HF dir -> (LlamaConfig, numpy params)
    convert.save_checkpoint("ckpt", cfg, params)                   # ringllama checkpoint (orbax + config JSON)
    cfg, params = convert.load_checkpoint("ckpt", mesh_shardings)  # restored straight into shardings
    cfg, params = convert.load_model(path)                         # ringllama, HF or Meta directory
    convert.save_hf(cfg, params, "out-hf", max_shard_size="5GB")   # back to transformers
    cfg, params = convert.load_meta("Meta-Llama-3-8B")             # consolidated.*.pth + params.json

    convert.save_peft("adapter", cfg, lora, params)               # LoRA -> PEFT adapter directory

Command line: ``python -m convert {hf-to-flax,flax-to-hf,flax-to-peft,meta-to-flax} SRC DST`` (see `convert.cli`).
Bad input raises `ConversionError` or `model.ConfigError`, each with one sentence naming the fix.
"""

from convert.checkpoint import (
    CONFIG_FILE,
    PARAMS_DIR,
    is_hf_checkpoint,
    is_ringllama_checkpoint,
    load_checkpoint,
    load_model,
    read_config,
    save_checkpoint,
)
from convert.hf import load_hf, save_hf
from convert.meta import half_to_interleaved, interleaved_to_half, is_meta_checkpoint, load_meta, meta_config
from convert.names import ConversionError
from convert.peft import is_lora_checkpoint, load_lora_checkpoint, merge_numpy, save_lora_checkpoint, save_peft
from convert.tree import relayout

__all__ = [
    "CONFIG_FILE",
    "PARAMS_DIR",
    "ConversionError",
    "half_to_interleaved",
    "interleaved_to_half",
    "is_hf_checkpoint",
    "is_lora_checkpoint",
    "is_meta_checkpoint",
    "is_ringllama_checkpoint",
    "load_checkpoint",
    "load_hf",
    "load_lora_checkpoint",
    "load_meta",
    "load_model",
    "merge_numpy",
    "meta_config",
    "read_config",
    "relayout",
    "save_checkpoint",
    "save_hf",
    "save_lora_checkpoint",
    "save_peft",
]
