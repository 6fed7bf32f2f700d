"""Meta's original Llama 3 checkpoints (``consolidated.*.pth`` + ``params.json``) → ringllama params.

Meta's q/k projections use the interleaved RoPE layout (rotation pairs are rows ``2j, 2j+1`` of
each head); ringllama and HF use the half-split layout (pairs ``j, j + h/2``), so q/k rows are
reordered per head to ``[even rows, odd rows]``. Everything else is a rename onto the HF names,
after which the one HF name map (`convert.names`) does the rest. Model-parallel checkpoints
(several ``consolidated.NN.pth``) are concatenated along the axis each tensor was split on.
torch is imported only here, and files load with ``weights_only=True`` (no pickled code runs)
and ``mmap=True``: tensors are paged in as they are converted, but a shard's touched pages stay
resident until all of its tensors are dropped, so this path peaks higher than the safetensors one
(about the model plus one consolidated shard).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from convert.hf import check_dtype
from convert.names import ConversionError, empty_params, expected_tensors, hf_to_flax, set_param
from model.config import ConfigError, LlamaConfig, RopeConfig

PARAMS_FILE = "params.json"
SHARD_GLOB = "consolidated.*.pth"
# Meta name → HF name; per-layer names carry ``{i}``.
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
IGNORED = ("rope.freqs",)  # precomputed RoPE table in older Meta checkpoints
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def is_meta_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds ``params.json`` and at least one ``consolidated.*.pth``."""
    p = Path(path)
    return (p / PARAMS_FILE).is_file() and any(p.glob(SHARD_GLOB))


def hf_name(meta: str) -> str | None:
    """The HF tensor name for a Meta one (None when it is not a Llama tensor)."""
    m = _LAYER.fullmatch(meta)
    if m:
        template = META_TO_HF.get(f"layers.{{i}}.{m.group(2)}")
        return template.format(i=int(m.group(1))) if template else None
    return META_TO_HF.get(meta)


def meta_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU width Meta's ``FeedForward`` computes from ``params.json``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def interleaved_to_half(w_oi: np.ndarray, heads: int) -> np.ndarray:
    """Meta → HF q/k rows: within each head, rows ``[0, 2, 4, …, 1, 3, 5, …]``. ``[heads·h, d]``."""
    rows, cols = w_oi.shape
    h = rows // heads
    return w_oi.reshape(heads, h // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def half_to_interleaved(w_oi: np.ndarray, heads: int) -> np.ndarray:
    """HF → Meta q/k rows, the inverse of `interleaved_to_half`. ``[heads·h, d]``."""
    rows, cols = w_oi.shape
    h = rows // heads
    return w_oi.reshape(heads, 2, h // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def meta_config(
    params: dict[str, Any],
    *,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int | None = None,
    rope_scaling_factor: float | None = None,
    scan_layers: bool = True,
) -> LlamaConfig:
    """A `LlamaConfig` from Meta's ``params.json`` dict.

    ``use_scaled_rope`` selects Llama 3.1's ``llama3`` rope scaling (low/high frequency factors
    1 and 4 over an 8192-token original context); its factor comes from ``rope_scaling_factor``
    in the file, else the argument, else 8 (Llama 3.1; Llama 3.2 1B/3B use 32).
    """
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise ConfigError(f"{PARAMS_FILE} lacks {key!r}: it is not a Meta Llama params file.")
    dim, heads = int(params["dim"]), int(params["n_heads"])
    vocab = int(params.get("vocab_size") or -1)
    if vocab <= 0:
        if vocab_size is None:
            raise ConfigError(f"{PARAMS_FILE} has no vocab_size and the weights do not say it either.")
        vocab = vocab_size
    theta = float(params.get("rope_theta", 10000.0))
    if params.get("use_scaled_rope"):
        factor = params.get("rope_scaling_factor") or rope_scaling_factor or 8.0
        rope = RopeConfig(
            rope_type="llama3",
            theta=theta,
            factor=float(factor),
            low_freq_factor=1.0,
            high_freq_factor=float(params.get("rope_high_freq_factor") or 4.0),
            original_max_position_embeddings=8192,
        )
        default_ctx = 131072
    else:
        rope, default_ctx = RopeConfig(theta=theta), 8192
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=meta_intermediate_size(
            dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")
        ),
        num_layers=int(params["n_layers"]),
        num_heads=heads,
        num_kv_heads=int(params.get("n_kv_heads") or heads),
        head_dim=dim // heads,
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        max_position_embeddings=int(max_position_embeddings or params.get("max_seq_len") or default_ctx),
        tie_word_embeddings=tie_word_embeddings,
        rope=rope,
        scan_layers=scan_layers,
    )


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes.bfloat16
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def _merge(name: str, pieces: list, full: tuple[int, ...]):
    """Reassemble a tensor that model parallelism split along one axis (replicated ones pass through)."""
    import torch

    shapes = [tuple(p.shape) for p in pieces]
    if all(s == full for s in shapes):
        return pieces[0]
    for axis in range(len(full)):
        others_match = all(s[:axis] + s[axis + 1 :] == full[:axis] + full[axis + 1 :] for s in shapes)
        if others_match and sum(s[axis] for s in shapes) == full[axis]:
            return torch.cat(pieces, dim=axis)
    raise ConversionError(
        f"tensor {name} comes in pieces of shapes {shapes} that do not assemble into {full}: "
        f"the checkpoint does not match {PARAMS_FILE}."
    )


def _load_shards(files: list[Path]) -> list[dict]:
    import torch

    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
            raise ConversionError(
                f"{f} is not a readable torch checkpoint ({type(exc).__name__}): it is truncated or corrupt."
            ) from exc
    return shards


def load_meta(
    path: str | os.PathLike,
    dtype: str | None = None,
    *,
    scan_layers: bool = True,
    progress: bool | None = None,
    max_position_embeddings: int | None = None,
    rope_scaling_factor: float | None = None,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Read Meta's ``consolidated.*.pth`` + ``params.json`` into ringllama host params.

    Args:
      path: the Meta checkpoint directory.
      dtype: output dtype; None keeps the stored one (bf16 for Meta's releases).
      scan_layers: stacked or per-layer params layout.
      progress: tqdm bar (None: only on a terminal).
      max_position_embeddings, rope_scaling_factor: what ``params.json`` does not record
        (defaults: 131072 and 8 with ``use_scaled_rope``, else 8192).

    Returns:
      ``(config, params)`` as `convert.load_hf` returns them. A checkpoint without
      ``output.weight`` is treated as tied to the embedding.
    """
    src = Path(path)
    check_dtype(dtype)
    if not (src / PARAMS_FILE).is_file():
        raise ConfigError(f"no {PARAMS_FILE} in {src}: point at a Meta Llama checkpoint directory.")
    files = sorted(src.glob(SHARD_GLOB))
    if not files:
        raise ConversionError(f"no {SHARD_GLOB} files in {src}: point at a Meta Llama checkpoint directory.")
    try:
        meta_params = json.loads((src / PARAMS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{src / PARAMS_FILE} is not valid JSON ({exc.msg}): fix or replace it.") from exc
    shards = _load_shards(files)
    names = [n for n in shards[0] if n not in IGNORED]
    for f, shard in zip(files[1:], shards[1:], strict=True):
        if sorted(n for n in shard if n not in IGNORED) != sorted(names):
            raise ConversionError(
                f"{f.name} holds different tensors from {files[0].name}: the shards do not belong together."
            )
    unknown = [n for n in names if hf_name(n) is None]
    if unknown:
        raise ConversionError(f"unexpected tensor {unknown[0]} in {files[0].name}: it is not a Meta Llama checkpoint.")
    if "tok_embeddings.weight" not in names:
        raise ConversionError(f"{files[0].name} lacks tok_embeddings.weight: the checkpoint is incomplete.")
    embed = [s["tok_embeddings.weight"] for s in shards]
    width = int(meta_params.get("dim", 0))
    vocab = embed[0].shape[0] if embed[0].shape[1] != width else sum(e.shape[0] for e in embed)
    cfg = meta_config(
        meta_params,
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=max_position_embeddings,
        rope_scaling_factor=rope_scaling_factor,
        scan_layers=scan_layers,
    )
    expected = expected_tensors(cfg)
    by_hf = {hf_name(n): n for n in names}
    missing = sorted(set(expected) - set(by_hf))
    extra = sorted(set(by_hf) - set(expected))
    if missing or extra:
        what = f"lacks the Meta tensor for {missing[0]}" if missing else f"holds {by_hf[extra[0]]}"
        raise ConversionError(f"the checkpoint in {src} {what}, which does not match {PARAMS_FILE}.")

    dtype = dtype or np.dtype(_to_numpy(embed[0][:1]).dtype).name
    del embed
    check_dtype(dtype)
    cfg = cfg.replace(param_dtype=dtype)
    params = empty_params(cfg, np.dtype(dtype))
    bar_off = None if progress is None else not progress
    with tqdm(total=len(expected), desc="reading tensors", unit="tensor", disable=bar_off) as bar:
        for name, (rule, layer) in expected.items():
            meta = by_hf[name]
            array = _to_numpy(_merge(meta, [s[meta] for s in shards], rule.hf_shape(cfg)))
            if name.endswith("q_proj.weight"):
                array = interleaved_to_half(array, cfg.num_heads)
            elif name.endswith("k_proj.weight"):
                array = interleaved_to_half(array, cfg.num_kv_heads)
            set_param(params, rule, layer, cfg, hf_to_flax(name, array, rule, cfg))
            for shard in shards:  # drop our references so the mapped pages can go
                del shard[meta]
            bar.update()
    return cfg, params
