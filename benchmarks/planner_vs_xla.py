"""The memory planner against XLA's compiled ``memory_analysis()`` of a real training step.

For each shape, one AdamW training step (chunked cross-entropy from `model.loss`, gradients,
``optax.adamw`` update) of a small Llama is jitted on the emulated CPU mesh with the rules
table's shardings and donated state, compiled, and its per-device memory read back:

- XLA ``argument`` bytes (params + AdamW state + tokens) ↔ the plan's ``state``;
- XLA ``temp`` bytes (everything alive only during the step) ↔ the plan's ``temporaries``
  (gradients, saved activations, layer working set, attention, logits);
- XLA total = ``argument + output − alias + temp`` (donated outputs alias their inputs) ↔
  the plan's ``total``.

Run: ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.planner_vs_xla``
(prints a Markdown table for BENCHMARKS.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import jax.numpy as jnp
import optax

import model
from model.loss import chunked_cross_entropy
from sharding.mesh import MeshConfig, make_mesh
from sharding.planner import MemoryPlan, plan_memory
from sharding.rules import axis_rules, batch_sharding, opt_state_shardings, param_shardings, replicated


@dataclass(frozen=True)
class Shape:
    """One planner-vs-XLA comparison point."""

    name: str
    mesh: MeshConfig
    batch: int
    seq_len: int
    overrides: tuple[tuple[str, object], ...]
    loss_chunk: int = 256

    def config(self) -> model.LlamaConfig:
        return model.preset("tiny", **dict(self.overrides))


@dataclass(frozen=True)
class Measured:
    shape: Shape
    plan: MemoryPlan
    argument: int
    output: int
    alias: int
    temp: int
    compile_s: float

    @property
    def xla_total(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    @property
    def ratio(self) -> float:
        return self.plan.total / self.xla_total


def _step(cfg, mesh, opt, loss_chunk):
    net = model.Llama(cfg, mesh=mesh)

    def loss_fn(params, tokens):
        hidden = net.apply({"params": params}, tokens, return_hidden=True)
        total, count = chunked_cross_entropy(
            hidden, model.lm_head_kernel(params, cfg), tokens, jnp.ones(tokens.shape), loss_chunk
        )
        return total / count

    @axis_rules(mesh)
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def measure(shape: Shape) -> Measured:
    """Compile one training step for ``shape`` and compare it with `plan_memory`."""
    cfg = shape.config()
    mesh = make_mesh(shape.mesh)
    opt = optax.adamw(1e-3)
    p_sh = param_shardings(model.abstract_params(cfg), mesh)
    params = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    state = jax.eval_shape(opt.init, params)
    s_sh = opt_state_shardings(state, p_sh, params, mesh)
    b_sh = batch_sharding(mesh, (shape.batch, shape.seq_len))
    tokens = jax.ShapeDtypeStruct((shape.batch, shape.seq_len), jnp.int32, sharding=b_sh)
    fn = jax.jit(
        _step(cfg, mesh, opt, shape.loss_chunk),
        in_shardings=(p_sh, s_sh, b_sh),
        out_shardings=(p_sh, s_sh, replicated(mesh)),
        donate_argnums=(0, 1),
    )
    start = time.perf_counter()
    stats = fn.lower(params, state, tokens).compile().memory_analysis()
    seconds = time.perf_counter() - start
    plan = plan_memory(
        cfg, model.abstract_params(cfg), shape.seq_len, shape.batch, shape.mesh, loss_chunk=shape.loss_chunk
    )
    return Measured(
        shape,
        plan,
        stats.argument_size_in_bytes,
        stats.output_size_in_bytes,
        stats.alias_size_in_bytes,
        stats.temp_size_in_bytes,
        seconds,
    )


# The shapes tests/test_planner.py checks (keep them small: each is one compile on a 2-core box).
TESTED = (
    Shape(
        "ring, remat full",
        MeshConfig(data=2, fsdp=1, tensor=1, sequence=4),
        2,
        1024,
        (("attention_impl", "ring"), ("remat_policy", "full"), ("attention_chunk", 32)),
    ),
    Shape(
        "blockwise, remat dots, FSDP+TP",
        MeshConfig(data=1, fsdp=4, tensor=2, sequence=1),
        4,
        512,
        (("attention_impl", "blockwise"), ("remat_policy", "dots"), ("attention_chunk", 64)),
    ),
)
EXTRA = (
    Shape(
        "ring, remat full, bf16 compute, FSDP",
        MeshConfig(data=1, fsdp=2, tensor=1, sequence=4),
        2,
        1024,
        (("attention_impl", "ring"), ("remat_policy", "full"), ("attention_chunk", 32), ("dtype", "bfloat16")),
    ),
    Shape(
        "ring, remat dots_with_no_batch_dims, TP",
        MeshConfig(data=1, fsdp=1, tensor=2, sequence=4),
        2,
        1024,
        (("attention_impl", "ring"), ("remat_policy", "dots_with_no_batch_dims"), ("attention_chunk", 32)),
    ),
    Shape(
        "blockwise, remat full, FSDP+TP+DP",
        MeshConfig(data=2, fsdp=2, tensor=2, sequence=1),
        4,
        512,
        (("attention_impl", "blockwise"), ("remat_policy", "full"), ("attention_chunk", 64)),
    ),
    Shape(
        "ring, no remat",
        MeshConfig(data=1, fsdp=2, tensor=1, sequence=4),
        2,
        1024,
        (("attention_impl", "ring"), ("remat_policy", "none"), ("attention_chunk", 32)),
    ),
    Shape(
        "ring, no remat, unscanned layers",
        MeshConfig(data=1, fsdp=2, tensor=1, sequence=4),
        2,
        1024,
        (("attention_impl", "ring"), ("remat_policy", "none"), ("attention_chunk", 32), ("scan_layers", False)),
    ),
)


def _mb(x: int) -> str:
    return f"{x / 2**20:.2f}"


def main() -> None:
    print(
        "| shape | mesh | b × t | XLA arg MiB | plan state MiB | XLA temp MiB | plan temp MiB "
        "| XLA total MiB | plan total MiB | plan / XLA |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in TESTED + EXTRA:
        m = measure(shape)
        print(
            f"| {shape.name} | {shape.mesh.describe()} | {shape.batch} × {shape.seq_len} | {_mb(m.argument)} "
            f"| {_mb(m.plan.state)} | {_mb(m.temp)} | {_mb(m.plan.temporaries)} | {_mb(m.xla_total)} "
            f"| {_mb(m.plan.total)} | {m.ratio:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
