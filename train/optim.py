"""The optimizer: AdamW with linear warmup, a cosine/linear/constant schedule, global-norm clipping
and a weight-decay mask.

Decisions:
- **Weight decay** applies to the matmul kernels only (leaves named ``kernel``: q/k/v/o, gate/up/down
  and an untied ``lm_head``) and LoRA factors (``lora_a``/``lora_b``: decaying B pulls the adapted
  model toward its base, as PEFT + the HF Trainer do). Norm scales and the token embedding are not
  decayed — decaying a norm scale pulls it toward 0 (not toward the identity 1), and decaying
  embeddings shrinks rare tokens' rows that get few gradient updates. With ``tie_word_embeddings``
  the shared matrix counts as an embedding. The mask goes by name, not by rank, because scanned
  layers give norm scales a leading ``[layers]`` axis.
- **Schedule**: ``lr · (step + 1) / warmup`` during warmup (the first step already moves, unlike a
  warmup from exactly 0), then cosine or linear decay to ``lr · min_lr_ratio`` at ``total_steps``,
  or constant.
- **The learning rate is applied outside optax**: `make_optimizer` returns the lr-free direction
  (clip → Adam → decoupled decay) and the train step multiplies it by ``-schedule(state.step)``.
  ``state.step`` counts updates *within the current stage*, so a new curriculum stage restarts its
  warmup and schedule by resetting ``step`` while Adam's moments (and their bias-correction count)
  carry over unchanged — with optax's own schedule counter that would need surgery on opt_state.
- **Gradient accumulation** is not an optax wrapper: the train step scans over micro-batches and
  hands the optimizer one averaged gradient (see `train.step`), so the optimizer state, the step
  counter and the schedule all count optimizer updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import optax

from model import schema
from model.config import ConfigError

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule settings; ``grad_accum_steps`` micro-batches make one optimizer update."""

    lr: float = 3e-4
    """peak learning rate"""
    schedule: str = "cosine"
    """cosine | linear | constant (after warmup)"""
    warmup_steps: int = 0
    """linear warmup steps at the start of every stage"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of lr"""
    weight_decay: float = 0.1
    """decoupled weight decay on matmul kernels (not norms or embeddings)"""
    b1: float = 0.9
    """Adam β1"""
    b2: float = 0.95
    """Adam β2"""
    eps: float = 1e-8
    """Adam ε"""
    clip_norm: float = 1.0
    """global gradient-norm clipping (0: off)"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step"""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown optim.schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}.")
        checks = [
            ("lr", self.lr >= 0, "a learning rate ≥ 0"),
            ("warmup_steps", int(self.warmup_steps) == self.warmup_steps and self.warmup_steps >= 0, "an int ≥ 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "a fraction in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, "≥ 0"),
            ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
            ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("clip_norm", self.clip_norm >= 0, "≥ 0 (0 turns clipping off)"),
            (
                "grad_accum_steps",
                int(self.grad_accum_steps) == self.grad_accum_steps and self.grad_accum_steps >= 1,
                "an int ≥ 1",
            ),
        ]
        for name, ok, want in checks:
            if not ok or (isinstance(getattr(self, name), float) and not math.isfinite(getattr(self, name))):
                raise ConfigError(f"optim.{name} must be {want}, got {getattr(self, name)!r}.")

    def replace(self, **changes: Any) -> OptimConfig:
        """A copy with ``changes``, checked like a config file's values (``replace(lr="1e-3")`` works)."""
        return schema.build(OptimConfig, {**schema.to_dict(self), **changes}, label="optim")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OptimConfig:
        """Build from a plain mapping; unknown keys and ill-typed values are a `ConfigError` naming them."""
        return schema.build(cls, data, label="optim")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based) within a stage of ``total_steps``."""
    warmup = int(cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    # Evaluated at step + 1: the first update already moves (optax's ramp starts at exactly 0). Joined
    # even without warmup, so the constant schedule too returns an fp32 array shaped like the step.
    ramp = optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
    return optax.join_schedules([lambda step: ramp(step + 1), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """``True`` for leaves that get weight decay: the matmul kernels (``kernel``) and LoRA factors."""

    def is_kernel(path, _leaf) -> bool:
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) in ("kernel", "lora_a", "lora_b")

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The update direction: global-norm clipping, Adam moments, decoupled weight decay (`decay_mask`).

    Multiply the result by ``-lr`` (`make_schedule`) to get the AdamW update, as `apply_updates` does.
    """
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def apply_updates(
    tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any, lr: jax.Array
) -> tuple[Any, Any]:
    """One AdamW update: ``params - lr · direction`` (cast back to each param's dtype), new opt state."""
    direction, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, optax.tree.scale(-lr, direction)), opt_state
