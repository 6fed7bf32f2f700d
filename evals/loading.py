"""Opening what an eval runs on: the model (ringllama checkpoint, HF directory or a preset), its tokenizer, the mesh.

Every failure is an `EvalInputError` with one sentence naming the problem and the fix (the
CLI turns it into exit status 2).
"""

from __future__ import annotations

import os

import jax

import convert
import model
from model.config import ConfigError, LlamaConfig
from sharding.mesh import MeshConfig, MeshError, make_mesh
from sharding.rules import shard_params
from text.tokenizer import TokenizerError, load_tokenizer


class EvalInputError(ValueError):
    """Bad eval input (model path, tokenizer, data file, flag); the message says what to change."""


def load_model(path: str, *, hf: bool = False, dtype: str | None = None, mesh=None) -> tuple[LlamaConfig, dict]:
    """``(config, params)`` from a ringllama checkpoint, a Hugging Face directory, or ``preset:NAME`` (random init).

    With a mesh the params are placed by the sharding rules table; otherwise on the default device.
    """
    if path.startswith("preset:"):
        try:
            cfg = model.preset(path.split(":", 1)[1])
        except ConfigError as exc:
            raise EvalInputError(str(exc)) from exc
        if dtype:
            cfg = cfg.replace(param_dtype=dtype)
        params = model.init_params(cfg, jax.random.key(0))
    else:
        if not os.path.isdir(path):
            raise EvalInputError(
                f"model {path} does not exist: give a ringllama checkpoint or Hugging Face model directory "
                "(or preset:tiny for random weights)."
            )
        if hf and not convert.is_hf_checkpoint(path):
            raise EvalInputError(f"{path} is not a Hugging Face model directory (config.json + *.safetensors).")
        try:
            cfg, params = convert.load_model(path, dtype=dtype)
        except (convert.ConversionError, ConfigError) as exc:
            raise EvalInputError(f"cannot load model {path}: {exc}") from exc
    if mesh is not None:
        params = shard_params(params, mesh, model.logical_axes(cfg))
    else:
        params = jax.device_put(params)
    return cfg, params


def load_eval_tokenizer(model_path: str, spec: str | None, config: LlamaConfig | None = None):
    """``spec`` if given, else the checkpoint's own ``tokenizer.json``/``tokenizer.model``, else bytes.

    With ``config`` the tokenizer's ids must fit the model's vocabulary (see `check_vocab`).
    """
    if spec is None:
        own = [f for f in ("tokenizer.json", "tokenizer.model") if os.path.isfile(os.path.join(model_path, f))]
        spec = model_path if own else "byte"
    try:
        tok = load_tokenizer(spec)
    except TokenizerError as exc:
        raise EvalInputError(str(exc)) from exc
    if config is not None:
        check_vocab(tok, config)
    return tok


def check_vocab(tokenizer, config: LlamaConfig) -> None:
    """Refuse a tokenizer whose ids do not fit the model's embedding table."""
    if tokenizer.vocab_size > config.vocab_size:
        raise EvalInputError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary has {config.vocab_size}: "
            "give the model's own tokenizer with --tokenizer."
        )


def parse_mesh(text: str | None):
    """A mesh from ``"data=1,sequence=8"`` (None: no mesh, one device)."""
    if not text:
        return None
    try:
        return make_mesh(MeshConfig.parse(text))
    except MeshError as exc:
        raise EvalInputError(str(exc)) from exc
