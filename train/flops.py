"""Model FLOPs of a train step, for MFU: matmuls (6 per parameter per token) plus causal attention.

Conventions (the PaLM / MaxText "model FLOPs" ones): a multiply-add is 2 FLOPs; the backward costs
twice the forward, so a train step is 3× the forward; recomputation from remat is *not* counted
(it is hardware FLOPs, not model FLOPs); the embedding lookup is free; the output head counts as a
matmul even when tied. Attention per layer and sequence of length S: ``QKᵀ`` and ``PV`` each take
``2·S²·n·h`` FLOPs dense; a causal mask halves that (query t sees t+1 keys). Packed documents
attend less in practice, but MFU is quoted against the full causal sequence, as usual.
"""

from __future__ import annotations

from model.config import LlamaConfig


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token (all but the embedding table and norms)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    return cfg.num_layers * (attn + 3 * d * f) + d * cfg.vocab_size


def attention_flops_per_token(cfg: LlamaConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward attention-score FLOPs per token (all layers), averaged over a sequence of ``seq_len``."""
    dense = 4.0 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_layers  # QKᵀ + PV, per query token
    return dense / 2 if causal else dense


def flops_per_token(cfg: LlamaConfig, seq_len: int, *, causal: bool = True, train: bool = True) -> float:
    """Model FLOPs per token at sequence length ``seq_len``: forward only, or ×3 for a train step."""
    forward = 2.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len, causal=causal)
    return 3.0 * forward if train else forward


def train_step_flops(cfg: LlamaConfig, seq_len: int, batch: int, *, causal: bool = True) -> float:
    """Model FLOPs of one optimizer step over ``batch`` sequences of ``seq_len`` (all micro-batches)."""
    return flops_per_token(cfg, seq_len, causal=causal) * seq_len * batch
