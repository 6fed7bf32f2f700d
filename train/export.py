"""The final model on disk: a ringllama checkpoint, an optional Hugging Face export, and a transformers check.

The config written with both carries the last stage's θ and max positions, so the export is
directly usable (``LlamaForCausalLM.from_pretrained(<run_dir>/hf)``). `check_transformers`
loads the export with transformers and compares its logits with ringllama's on a prompt.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np

from model.config import LlamaConfig

# fp32 logits of two implementations of the same fp32 model agree to ~1e-5; anything above
# this means a wrong conversion (a transposed or misnamed tensor moves logits by O(1)).
LOGITS_ATOL = 1e-3


def export_final(run_dir: str, cfg: LlamaConfig, params: Any, *, hf: bool) -> dict[str, str]:
    """Write ``<run_dir>/final`` (ringllama) and, with ``hf``, ``<run_dir>/hf``; returns their paths."""
    import convert

    paths = {"final": os.path.join(run_dir, "final")}
    if hf:
        paths["hf"] = os.path.join(run_dir, "hf")
    for path in paths.values():  # this run's own outputs from an earlier attempt
        if os.path.isdir(path):
            shutil.rmtree(path)
    convert.save_checkpoint(paths["final"], cfg, params)
    if hf:
        convert.save_hf(cfg, params, paths["hf"], progress=False)
    return paths


def check_transformers(hf_dir: str, cfg: LlamaConfig, params: Any, prompt_tokens: int = 64) -> dict:
    """Load ``hf_dir`` with transformers and compare its logits with ringllama's on a fixed prompt."""
    import jax.numpy as jnp
    import torch
    from transformers import LlamaForCausalLM

    from model.llama import Llama

    n = min(prompt_tokens, cfg.max_position_embeddings)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(1, n)).astype(np.int64)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens)).logits.float().numpy()
    local = cfg.replace(attention_impl="reference", dtype="float32")
    ours = np.asarray(Llama(local).apply({"params": params}, jnp.asarray(tokens, jnp.int32)), np.float32)
    diff = float(np.max(np.abs(ours - theirs)))
    return {
        "loaded": True,
        "max_abs_diff": diff,
        "prompt_tokens": n,
        "hf_rope_theta": float(hf.config.rope_parameters["rope_theta"])
        if getattr(hf.config, "rope_parameters", None)
        else float(getattr(hf.config, "rope_theta", float("nan"))),
        "verdict": "logits match" if diff <= LOGITS_ATOL else f"logits DIFFER (tolerance {LOGITS_ATOL})",
    }
