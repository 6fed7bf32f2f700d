"""The learning-rate schedule (optax's join/cosine/linear/constant) against the formula it replaced.

Bitwise equality is not possible (optax orders the fp32 operations differently), so the check is
one fp32 ulp of the peak learning rate at every step. The reference below is the hand-written schedule ringllama used before optax's schedules took its
place, kept here verbatim as the independent check: warmup ``lr·(step+1)/warmup``, then cosine or
linear decay to ``lr·min_lr_ratio`` at ``total_steps``, or constant.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ConfigError
from train.optim import OptimConfig, apply_updates, make_optimizer, make_schedule


def reference_schedule(cfg: OptimConfig, total_steps: int):
    warmup = int(cfg.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            decayed = floor + (cfg.lr - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif cfg.schedule == "linear":
            decayed = cfg.lr + (floor - cfg.lr) * frac
        else:
            decayed = jnp.full_like(frac, cfg.lr)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


CASES = list(
    itertools.product(
        ("cosine", "linear", "constant"),
        (0, 1, 3, 12, 20),  # warmup 0, 1, inside the stage, equal to it, longer than it
        (0.0, 0.1, 1.0),  # min_lr_ratio: decay to zero, the default, no decay
        (1, 12),  # total steps
    )
)


@pytest.mark.parametrize(("schedule", "warmup", "ratio", "total"), CASES)
def test_schedule_equals_the_hand_written_formula_at_every_step(schedule, warmup, ratio, total):
    cfg = OptimConfig(lr=3e-3, schedule=schedule, warmup_steps=warmup, min_lr_ratio=ratio)
    steps = jnp.arange(total + warmup + 5, dtype=jnp.int32)  # past the end too: the final value holds
    ulp = np.spacing(np.float32(cfg.lr))
    for wrap in (lambda f: f, jax.jit):  # eager and inside a jitted step (XLA fuses differently)
        ours = np.asarray(wrap(make_schedule(cfg, total))(steps))
        ref = np.asarray(wrap(reference_schedule(cfg, total))(steps))
        assert ours.dtype == ref.dtype == np.float32
        # optax rounds e.g. cos(π·count/T) where the old code rounded cos(π·(count/T)).
        np.testing.assert_allclose(ours, ref, rtol=0, atol=ulp)


def test_schedule_edge_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, schedule="cosine")
    sched = make_schedule(cfg, 14)
    assert [float(sched(s)) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the first step already moves
    assert float(sched(4)) == 1.0 and float(sched(14)) == pytest.approx(0.1, rel=1e-6)
    assert float(make_schedule(cfg.__class__(lr=2.0, schedule="constant"), 5)(0)) == 2.0  # warmup 0


def test_apply_updates_is_params_minus_lr_times_direction():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    tx = make_optimizer(OptimConfig(weight_decay=0.0, clip_norm=0.0))
    direction, _ = tx.update(grads, tx.init(params), params)
    lr = jnp.float32(1e-2)
    new, _ = apply_updates(tx, grads, tx.init(params), params, lr)
    for name in params:
        expected = (params[name] - lr * direction[name]).astype(params[name].dtype)
        assert new[name].dtype == params[name].dtype
        np.testing.assert_array_equal(np.asarray(new[name], np.float32), np.asarray(expected, np.float32))


def test_optim_config_reads_checks_and_replaces_through_the_config_library():
    cfg = OptimConfig.from_dict({"lr": "1e-3", "warmup_steps": 5.0, "schedule": "linear"})  # YAML reads 1e-3 as text
    assert cfg == OptimConfig(lr=1e-3, warmup_steps=5, schedule="linear") and isinstance(cfg.warmup_steps, int)
    assert cfg.replace(lr="2e-3").lr == 2e-3 and cfg.replace(lr="2e-3").schedule == "linear"
    with pytest.raises(ConfigError, match=r"unknown optim field lr_max: remove it or use one of lr, schedule"):
        cfg.replace(lr_max=1.0)
    with pytest.raises(ConfigError, match=r"warmup_steps must be an int, got 2.5 \(wrong type\)"):
        OptimConfig.from_dict({"warmup_steps": 2.5})
    with pytest.raises(ConfigError, match=r"optim.min_lr_ratio must be a fraction in \[0, 1\], got 2.0"):
        cfg.replace(min_lr_ratio=2)  # the dataclass's own checks run too
