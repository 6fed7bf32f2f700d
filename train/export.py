"""The final model on disk: a ringllama checkpoint, an optional Hugging Face export, and a transformers check.

The config written with both carries the last stage's θ and max positions, so the export is
directly usable (``LlamaForCausalLM.from_pretrained(<run_dir>/hf)``). `check_transformers`
loads the export with transformers and compares its logits with ringllama's on a prompt.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np

import convert
from model.config import LlamaConfig
from model.llama import Llama
from text.synthetic import passkey_sample

# fp32 logits of two implementations of the same fp32 model agree to ~1e-5; anything above
# this means a wrong conversion (a transposed or misnamed tensor moves logits by O(1)).
LOGITS_ATOL = 1e-3


def export_final(run_dir: str, cfg: LlamaConfig, params: Any, *, hf: bool) -> dict[str, str]:
    """Write ``<run_dir>/final`` (ringllama) and, with ``hf``, ``<run_dir>/hf``; returns their paths."""
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
    import torch  # optional: only the transformers check needs torch and transformers
    from transformers import LlamaForCausalLM

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


def hf_greedy_passkey(
    hf_dir: str,
    tokenizer,
    *,
    length: int,
    prompts: int,
    seed: int,
    filler: str = "classic",
    template: str = "classic",
    reserve: int = 8,
) -> dict:
    """Greedy generation through transformers on fresh passkey prompts of ``length`` tokens (answer included).

    Independent of ringllama's teacher-forced scoring: the export is loaded by
    ``LlamaForCausalLM`` and decodes the key itself. Depths are spread evenly over [0.05, 0.95].

    Returns:
        ``{"length", "prompts", "correct", "accuracy", "examples": [{"depth", "key", "generated"}]}``.
    """
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    hf.eval()
    rng = np.random.default_rng([seed, length, 0x6B6579])  # fresh: not the seeds of the eval grid
    examples = []
    for i in range(prompts):
        depth = 0.05 + 0.9 * i / max(prompts - 1, 1)
        sample = passkey_sample(tokenizer, length - reserve, depth, rng, filler=filler, template=template)
        ids = torch.tensor([sample.prompt_ids], dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=len(sample.answer_ids) + 2,
                do_sample=False,
                pad_token_id=tokenizer.pad_id,
            )
        text = tokenizer.decode(out[0, ids.shape[1] :].tolist())
        examples.append({"depth": round(depth, 3), "key": sample.answer, "generated": text})
    correct = sum(e["key"] in e["generated"] for e in examples)
    return {"length": length, "prompts": prompts, "correct": correct, "accuracy": correct / max(prompts, 1),
            "examples": examples}  # fmt: skip
