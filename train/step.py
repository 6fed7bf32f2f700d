"""The jitted, sharded train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

One ``jax.jit`` per (config, mesh, batch shape) with explicit in/out shardings and the state donated:
params and Adam moments are sharded as the caller's state shardings say (`train.stage`), the batch
``[b, t]`` over ``(data, fsdp)`` × ``sequence`` (`sharding.rules.batch_sharding`), metrics replicated.
Activations follow the model's own constraints; with a ``sequence`` axis > 1 and
``attention_impl="auto"`` the model runs ring attention. Batches come from the data pipeline
already in the ring layout with explicit positions, so nothing here depends on the layout.

Numerics: params stay in ``param_dtype`` (fp32 master weights), the model computes in ``dtype``
(bf16 on accelerators), the loss and its reductions are fp32, and gradients are accumulated in
fp32. The loss is the mean over counted tokens of the *whole* batch: each micro-batch contributes
``loss_sum / count_total``, so k micro-batches give the same gradient as one big batch.

Gradient accumulation is a ``lax.scan`` over micro-batches inside the step (rather than
``optax.MultiSteps``): memory is one micro-batch's activations plus one fp32 gradient buffer, the
optimizer runs once per step, and ``state.step`` counts real updates. Micro-batch ``j`` takes rows
``j, j + k, j + 2k, …`` so each one keeps an equal share of every data-parallel shard.

A step whose loss or gradient norm is not finite leaves the state as it was (``finite=False`` in the
metrics; `train.guards.check_finite` turns that into an error naming the step).

With LoRA (``lora=``) the step differentiates only ``state.params`` (adapters and any trainable
embeddings/norms); ``state.frozen`` enters the forward as a constant of the gradient, so it gets no
gradient, no optimizer state and no weight-gradient matmuls, and passes through the step untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from model import lora as lora_lib
from model.config import LlamaConfig
from model.llama import Llama
from model.loss import chunked_cross_entropy
from model.params import lm_head_kernel
from sharding.rules import axis_rules, batch_sharding, constrain, replicated
from train.optim import apply_updates
from train.state import TrainState

Batch = dict[str, Any]
# What the model and the loss read; the data pipeline may add more fields (they are dropped).
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def _loss_sums(
    model: Llama, cfg: LlamaConfig, params: Any, batch: Batch, loss_chunk: int
) -> tuple[jax.Array, jax.Array]:
    hidden_btd = model.apply(
        {"params": params},
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_hidden=True,
    )
    head_dv = lm_head_kernel(params, cfg)
    return chunked_cross_entropy(hidden_btd, head_dv, batch["targets"], batch["loss_mask"], loss_chunk, model.mesh)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    """``[b, …]`` → ``[k, b/k, …]`` with micro-batch j = rows j, j+k, … (keeps every data shard busy)."""
    b = x.shape[0]
    return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)


def _batch_shardings(mesh: Mesh, batch: Batch) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, batch[k].shape) for k in BATCH_KEYS}


def put_batch(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """Place a batch on the mesh as global arrays (``[b, t]`` over data/fsdp × sequence).

    Host (numpy) arrays are this process's rows: with several processes each passes its own slice
    (the data iterator's) and the global array, ``process_count`` times taller, is assembled from
    them. Arrays already on devices are resharded only if their sharding differs.
    """
    out = {}
    for name in BATCH_KEYS:
        x = batch[name]
        if isinstance(x, jax.Array):
            out[name] = jax.device_put(x, batch_sharding(mesh, x.shape))
            continue
        x = np.asarray(x)
        if jax.process_count() == 1:
            out[name] = jax.device_put(x, batch_sharding(mesh, x.shape))
        else:
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), x, global_shape)
    return out


class CompiledStep:
    """``fn(x, batch)`` jitted once per batch shape with fixed shardings; the compile cache it owns.

    The train step (``x`` the `TrainState`) and the eval step (``x`` the params) are both one of these:
    calling it places the batch (`put_batch`) and runs the variant compiled for the batch's shapes,
    building it on first use. Benchmarks and memory checks lower exactly what runs with
    ``step.jitted(batch).lower(x, batch)`` (``batch`` may hold ``jax.ShapeDtypeStruct`` leaves).

    Attributes:
        step_fn: the un-jitted ``fn(x, batch)``, for lowering with other shardings.
        mesh: the device mesh; the batch is sharded on it by `sharding.rules.batch_sharding`.
        x_shardings: ``x``'s `NamedSharding` tree (in and, for the train step, out).
        out_shardings: the outputs' shardings.
        donate: donate ``x``'s buffers (the caller must not reuse it).
        batch_multiple: the global batch size must be a multiple of it (``grad_accum_steps``).
        compiled: the ``jax.jit`` variants by the batch's shapes (in `BATCH_KEYS` order).
    """

    def __init__(
        self,
        step_fn: Callable,
        mesh: Mesh,
        x_shardings: Any,
        out_shardings: Any,
        *,
        donate: bool = False,
        batch_multiple: int = 1,
    ):
        self.step_fn = step_fn
        self.mesh = mesh
        self.x_shardings = x_shardings
        self.out_shardings = out_shardings
        self.donate = donate
        self.batch_multiple = batch_multiple
        self.compiled: dict[tuple[tuple[int, ...], ...], Callable] = {}

    def jitted(self, batch: Batch) -> Callable:
        """The ``jax.jit`` of ``step_fn`` for ``batch``'s shapes (built on first use)."""
        shapes = tuple(tuple(batch[name].shape) for name in BATCH_KEYS)
        if shapes[0][0] % self.batch_multiple:
            raise ValueError(
                f"global batch size {shapes[0][0]} is not divisible by grad_accum_steps={self.batch_multiple}: "
                "make the batch size a multiple of it."
            )
        if shapes not in self.compiled:
            self.compiled[shapes] = jax.jit(
                self.step_fn,
                in_shardings=(self.x_shardings, _batch_shardings(self.mesh, batch)),
                out_shardings=self.out_shardings,
                donate_argnums=(0,) if self.donate else (),
            )
        return self.compiled[shapes]

    def __call__(self, x: Any, batch: Batch) -> Any:
        batch = put_batch(batch, self.mesh)
        return self.jitted(batch)(x, batch)


def make_train_step(
    model_cfg: LlamaConfig,
    mesh: Mesh,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: TrainState,
    *,
    grad_accum_steps: int = 1,
    loss_chunk: int = 1024,
    donate: bool = True,
    lora: lora_lib.LoraConfig | None = None,
) -> CompiledStep:
    """Build ``step(state, batch) -> (state, metrics)`` from an already built optimizer and shardings.

    `train.stage.build_engine` is the one caller: it builds ``tx``, ``schedule`` and ``shardings`` once
    per stage and hands the same objects to the state, the checkpoint restore and this step.

    Args:
        model_cfg: the model (its ``dtype``, ``remat_policy``, ``attention_impl`` apply).
        mesh: the device mesh.
        tx: the update direction (`train.optim.make_optimizer`).
        schedule: learning rate as a function of ``state.step`` (`train.optim.make_schedule`).
        shardings: the `TrainState` of `NamedSharding` the state has (`train.state.state_shardings`).
        grad_accum_steps: micro-batches per optimizer update.
        loss_chunk: positions per chunk of the chunked cross-entropy.
        donate: donate the input state's buffers (the caller must not reuse ``state``).
        lora: train LoRA adapters (a state split into trainable ``params`` and ``frozen``).

    Returns:
        A `CompiledStep` taking a `TrainState` and a batch dict of ``[b, t]`` arrays (``tokens``,
        ``targets``, ``positions``, ``segment_ids``, ``loss_mask``; placed with `put_batch`, so numpy
        host rows are fine) and returning the new state and metrics: ``loss`` (mean over counted tokens,
        weighted by ``loss_mask``), ``grad_norm`` (before clipping), ``lr``, ``tokens`` (tokens with a
        nonzero ``loss_mask``, as fp32), ``finite`` (bool).
        ``b`` must be divisible by ``grad_accum_steps``.
    """
    model = Llama(model_cfg, mesh=mesh, lora=lora)
    k = int(grad_accum_steps)
    st_sh = shardings
    rep = replicated(mesh)

    @axis_rules(mesh)
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        # loss_mask may carry weights (e.g. up-weighted answer tokens): the loss is their weighted mean.
        weight = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(weight, 1.0)
        tokens = jnp.sum(batch["loss_mask"] != 0).astype(jnp.float32)

        def objective(params, mb):
            # Named so a profile groups the forward and (through its transpose) backward ops under "loss".
            with jax.named_scope("loss"):
                full = params if state.frozen is None else lora_lib.combine(params, state.frozen)
                loss_sum, _ = _loss_sums(model, model_cfg, full, mb, loss_chunk)
                return loss_sum / denom, loss_sum

        grad_fn = jax.grad(objective, has_aux=True)
        if k == 1:
            grads, loss_sum = grad_fn(state.params, batch)
        else:
            micro = {name: _split_micro(batch[name], k) for name in BATCH_KEYS}

            def accumulate(carry, mb):
                g_acc, l_acc = carry
                mb = {name: constrain(x, ("batch", "length"), mesh) for name, x in mb.items()}
                g, l_sum = grad_fn(state.params, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, l_acc + l_sum), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            zeros = jax.lax.with_sharding_constraint(zeros, st_sh.params)
            (grads, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)

        loss = loss_sum / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        lr = schedule(state.step)
        with jax.named_scope("optimizer_update"):
            params, opt_state = apply_updates(tx, grads, state.opt_state, state.params, lr)
            new = (params, opt_state, state.step + 1)
            # A non-finite step changes nothing, so the in-memory state stays the last good one.
            old = (state.params, state.opt_state, state.step)
            new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new = TrainState(*new, frozen=state.frozen)  # the frozen base passes through (no select, no copy)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": tokens, "finite": finite}
        return new, metrics

    metrics_sh = dict.fromkeys(("loss", "grad_norm", "lr", "tokens", "finite"), rep)
    return CompiledStep(step, mesh, st_sh, (st_sh, metrics_sh), donate=donate, batch_multiple=k)


def make_eval_step(
    model_cfg: LlamaConfig, mesh: Mesh, param_sh: Any, *, loss_chunk: int = 1024, weighted: bool = False
) -> CompiledStep:
    """Build ``eval_step(params, batch) -> (loss_sum, count)`` for held-out perplexity (a `CompiledStep`).

    Sum the two over batches; perplexity is ``exp(Σ loss_sum / Σ count)``. By default every token
    with a nonzero ``loss_mask`` counts once (plain per-token perplexity, whatever weights the data
    pipeline put on answer tokens); ``weighted=True`` uses the mask's weights, as the train loss does.
    ``param_sh`` is the params' `NamedSharding` tree (the base model's, no adapters).
    """
    model = Llama(model_cfg, mesh=mesh)

    @axis_rules(mesh)
    def fn(params, batch):
        if not weighted:
            batch = dict(batch, loss_mask=(batch["loss_mask"] != 0).astype(jnp.float32))
        return _loss_sums(model, model_cfg, params, batch, loss_chunk)

    rep = replicated(mesh)
    return CompiledStep(fn, mesh, param_sh, (rep, rep))
