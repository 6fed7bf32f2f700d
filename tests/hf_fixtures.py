"""Tiny Hugging Face Llama models built locally (never from a hub) for reference comparisons."""

from __future__ import annotations

import numpy as np
import pytest


def tiny_hf_config(**overrides):
    """A small `transformers.LlamaConfig`; overrides go straight to it (e.g. ``rope_scaling=...``)."""
    import transformers

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_hf_model(seed: int = 0, **overrides):
    """A randomly initialised `transformers.LlamaForCausalLM` in fp32, eval mode.

    Norm weights are randomised too, so a converter that drops or swaps them is caught.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """The model's tensors as fp32 numpy arrays."""
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Reference logits ``[b, t, v]`` from transformers."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def ringllama_from_hf(model, **overrides):
    """``(LlamaConfig, params)`` for a transformers model, through `convert.names` only.

    ``overrides`` replace `LlamaConfig` fields (e.g. ``scan_layers=False``); the parameter
    layout follows them. Independent of `convert.load_hf`, so model tests do not lean on it.
    """
    import jax.numpy as jnp

    from convert import names
    from model import LlamaConfig

    cfg = LlamaConfig.from_hf(model.config.to_dict(), **overrides)
    state = hf_state_dict(model)
    params = names.empty_params(cfg, np.float32)
    for name, (rule, layer) in names.expected_tensors(cfg).items():
        names.set_param(params, rule, layer, cfg, names.hf_to_flax(name, state[name], rule, cfg))
    return cfg, _tree_map(jnp.asarray, params)


def _tree_map(fn, tree):
    return {k: _tree_map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch single-threaded for a test module: on tiny models its intra-op threads only spin,
    costing 10-50x the CPU time on a shared 2-core box. Use it by importing it into the module
    and setting ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
