"""Per-device memory plan of one training step: parameters, gradients, AdamW state, activations, attention.

`plan_memory(config, params, seq_len, batch, mesh, remat)` counts bytes per device from the same rules
table that shards the real arrays (`sharding.rules`), so the plan follows the mesh exactly:

- **parameters / gradients**: every parameter's local shard (``param_dtype``);
- **optimizer**: AdamW's two moments per parameter (fp32 by default), sharded like the params;
- **activations**: what the backward pass needs, per layer, by remat policy (per token, local
  sizes; ``d`` embed, ``n``/``k`` local query/kv heads, ``h`` head_dim, ``f`` local mlp):
  ``none`` keeps the layer input, both norm outputs, q, k, v, attention output and LSE, the
  residual after attention and the MLP's gate, up and product (``4d + 2nh + 2kh + 3f``);
  ``full`` keeps only the layer input (``d``) and recomputes the rest one layer at a time;
  ``dots`` keeps the matmul outputs (``3d + nh + 2kh + 2f``) and the dense attention scores;
  ``dots_with_no_batch_dims`` the same without the attention scores;
- **layer working set**: the backward of one layer: the recomputed activations (under remat)
  plus their cotangents; FSDP all-gathers of one layer's weights (this one and the next); with a
  compute dtype narrower than the params, the scanned layers' weights cast once, all layers at
  once (XLA hoists the cast out of the layer loop); under FSDP the full weight gradients of the
  embedding and head before their reduce-scatter, and the untied embedding's gathered copy
  (found in the TPU compiler's buffer assignment, ``python -m sharding compile``);
- **attention**: the implementation's working set: dense ``[t, s]`` fp32 scores for
  ``reference``/``xla``; chunk tiles, chunk-major input copies and fp32 accumulators for ``blockwise``;
  on a sequence-sharded mesh also the context-parallel strategy's buffers (``context_parallel``:
  ring, allgather, ulysses, hybrid), sized by `sharding.cp_plan.plan_strategies` (``kv_bytes`` +
  ``a2a_bytes``): the ring's K/V blocks and fp32 dK/dV in flight, allgather's full K/V of a layer,
  Ulysses' all-to-all buffers;
- **logits / loss**: one fp32 copy of one loss chunk's logits (the train loss is chunked over
  positions; softmax, gradient and cast fuse into the matmuls) and the gathered head. The loss's
  backward runs before the layers' and XLA reuses the same memory for both, so only the part of it
  above the layer phase (recompute + cotangents + attention) counts toward the total
  (``MemoryPlan.loss_peak`` keeps the whole).
- **LoRA** (``lora=``): the frozen base in ``lora.base_dtype``; gradients and AdamW moments only for
  the trainable leaves (adapters, plus embeddings/norms if trained); a layer's backward gathers the
  adapters with the base and produces only the trainable leaves' weight gradients; each adapted
  kernel saves its rank-r ``x·A`` per token.

The plan is checked against XLA's compiled ``memory_analysis()`` in ``tests/test_planner.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax

from attention.strategies import STRATEGIES
from model.lora import is_trainable
from sharding.cp_plan import LINKS, model_strategies
from sharding.mesh import AXES, MeshConfig
from sharding.rules import ACTIVATION_RULES, PARAM_RULES, local_shape, param_names_and_shapes

REMATS = ("none", "full", "dots", "dots_with_no_batch_dims")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


class PlanError(ValueError):
    """Planner inputs that describe no valid run; the message says what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, by category; ``total`` is their sum."""

    params: int
    grads: int
    optimizer: int
    activations: int
    layer_working: int
    attention: int
    logits: int
    batch: int
    description: str = ""
    loss_peak: int = 0
    """The loss's own peak (one chunk's logits, the gathered head); ``logits`` is its part above the layer phase."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    ROWS = (
        ("params", "parameters"),
        ("grads", "gradients"),
        ("optimizer", "optimizer state"),
        ("activations", "saved activations"),
        ("layer_working", "layer working set"),
        ("attention", "attention working set"),
        ("logits", "logits / loss"),
        ("batch", "batch (tokens, positions, ...)"),
    )

    @property
    def state(self) -> int:
        """Bytes that live across steps: parameters and optimizer state (the step's arguments)."""
        return self.params + self.optimizer + self.batch

    @property
    def temporaries(self) -> int:
        """Bytes that exist only during the step: gradients, activations, working sets."""
        return self.grads + self.activations + self.layer_working + self.attention + self.logits

    @property
    def total(self) -> int:
        return self.state + self.temporaries

    def fits(self, device_bytes: int, reserve: float = 0.0) -> bool:
        """Whether the plan fits ``device_bytes`` with a fraction ``reserve`` kept free."""
        return self.total <= device_bytes * (1.0 - reserve)

    def table(self, device_bytes: int | None = None) -> str:
        """A human-readable table (one row per category, GiB and % of the total)."""
        lines = [self.description] if self.description else []
        width = max(len(label) for _, label in self.ROWS)
        lines.append(f"  {'per device':<{width}}  {'GiB':>10}  {'share':>6}")
        for key, label in self.ROWS:
            v = getattr(self, key)
            lines.append(f"  {label:<{width}}  {v / GiB:>10.3f}  {100 * v / max(self.total, 1):>5.1f}%")
        lines.append(f"  {'total':<{width}}  {self.total / GiB:>10.3f}")
        if device_bytes is not None:
            free = device_bytes - self.total
            verdict = "fits" if free >= 0 else "does NOT fit"
            lines.append(
                f"  device memory {device_bytes / GiB:.2f} GiB: {verdict} "
                f"({'headroom' if free >= 0 else 'short by'} {abs(free) / GiB:.2f} GiB)"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def mesh_sizes(mesh, num_devices: int | None = None) -> dict[str, int]:
    """``{axis: size}`` from a `Mesh`, a `MeshConfig` (``num_devices`` resolves a -1) or a dict."""
    if isinstance(mesh, MeshConfig):
        sizes = [getattr(mesh, a) for a in AXES]
        if -1 in sizes:
            if num_devices is None:
                raise PlanError(
                    f"mesh {mesh.describe()} has a -1 axis: give every axis a size, or the device count (--devices)."
                )
            return dict(zip(AXES, mesh.resolve(num_devices), strict=True))
        if any(s < 1 for s in sizes):
            raise PlanError(f"mesh axis sizes must be positive, got {mesh.describe()}.")
        return dict(zip(AXES, sizes, strict=True))
    if isinstance(mesh, Mapping):
        return {a: int(mesh.get(a, 1)) for a in AXES}
    return {a: int(dict(mesh.shape).get(a, 1)) for a in AXES}


def _leaves(params) -> list[tuple[tuple[str, ...], tuple, tuple[int, ...]]]:
    """``(path keys, logical names, shape)`` of every parameter of a boxed tree."""
    names, shapes = param_names_and_shapes(params)
    flat = jax.tree_util.tree_flatten_with_path(names, is_leaf=lambda x: isinstance(x, tuple))[0]
    shape_leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    return [
        (tuple(str(getattr(k, "key", k)) for k in path), n, shape)
        for (path, n), shape in zip(flat, shape_leaves, strict=True)
    ]


def _param_counts(params, config, sizes: dict[str, int]) -> tuple[int, int, int, int]:
    """(local params, one layer's params gathered over fsdp, gathered embedding/head, local scanned-layer
    params) in elements."""
    no_fsdp = dict(sizes, fsdp=1)
    local = layer = head = scanned = 0
    for keys, n, shape in _leaves(params):
        here = math.prod(local_shape(n, shape, PARAM_RULES, sizes))
        local += here
        gathered = math.prod(local_shape(n, shape, PARAM_RULES, no_fsdp))
        top = keys[0]
        if top == "layers":
            layer += gathered // config.num_layers
            scanned += here
        elif top.startswith("layers_"):
            layer += gathered if top == "layers_0" else 0
        elif top in ("embed_tokens", "lm_head"):
            head = max(head, gathered)
    return local, layer, head, scanned


def _lora_counts(params, config, sizes: dict[str, int], lora) -> tuple[int, int, int, int]:
    """(trainable local, frozen local, one layer's trainable gathered, one layer's adapters gathered) elements."""
    no_fsdp = dict(sizes, fsdp=1)
    trainable = frozen = layer_trainable = layer_adapters = 0
    leaves = _leaves(params)
    if not any(keys[-1] == "lora_a" for keys, _, _ in leaves):
        raise PlanError("lora= needs params with the adapters: pass model.abstract_params(config, lora).")
    for keys, n, shape in leaves:
        count = math.prod(local_shape(n, shape, PARAM_RULES, sizes))
        gathered = math.prod(local_shape(n, shape, PARAM_RULES, no_fsdp))
        per_layer = gathered // config.num_layers if keys[0] == "layers" else (gathered if keys[0] == "layers_0" else 0)
        if is_trainable(keys, lora):
            trainable += count
            layer_trainable += per_layer
            layer_adapters += per_layer if keys[-1] in ("lora_a", "lora_b") else 0
        else:
            frozen += count
    return trainable, frozen, layer_trainable, layer_adapters


def resolve_attention(config, seq_len: int, sizes: dict[str, int], attention: str | None) -> str:
    """The attention implementation the step will run (``auto`` resolved like `attention.choose_impl`).

    On a sequence-sharded mesh ``auto`` is the config's ``context_parallel`` strategy (as the model
    refines it); a ``context_parallel: auto`` still unresolved here (the compile and the trainer
    resolve it per device type with `sharding.cp_plan.resolve_context_parallel`) is planned as the ring.
    """
    impl = attention or config.attention_impl
    if impl == "auto":
        if sizes["sequence"] > 1:
            cp = getattr(config, "context_parallel", "auto")
            return "ring" if cp == "auto" else cp
        return "reference" if seq_len <= 1024 else "blockwise"
    return impl


def plan_memory(
    config,
    params,
    seq_len: int,
    batch: int,
    mesh,
    remat: str | None = None,
    *,
    attention: str | None = None,
    loss_chunk: int | None = 1024,
    moment_bytes: int = 4,
    num_devices: int | None = None,
    lora=None,
) -> MemoryPlan:
    """Per-device memory of one AdamW training step.

    Args:
        config: a `model.LlamaConfig` (its ``dtype``/``param_dtype``/``attention_chunk`` are used).
        params: the parameter tree with its logical names, ``model.abstract_params(config, lora)``
            (with ``lora`` it must hold the adapters).
        seq_len, batch: global tokens per sequence and sequences per step.
        mesh: `MeshConfig` (sizes), a `jax.sharding.Mesh` or ``{axis: size}``.
        remat: remat policy (default ``config.remat_policy``): none | full | dots | dots_with_no_batch_dims.
        attention: override ``config.attention_impl`` (reference | xla | blockwise | ring | auto).
        loss_chunk: positions per chunk of the chunked cross-entropy (`model.loss`); None for
            full ``[b, t, v]`` logits.
        moment_bytes: bytes per AdamW moment element (4: fp32).
        num_devices: resolves a ``-1`` axis of a `MeshConfig`.
        lora: a `model.lora.LoraConfig`: plan LoRA training (frozen base, trainable adapters).
    """
    remat = config.remat_policy if remat is None else remat
    if remat not in REMATS:
        raise PlanError(f"unknown remat policy {remat!r}: use one of {', '.join(REMATS)}.")
    if seq_len < 1 or batch < 1:
        raise PlanError(f"seq_len and batch must be positive, got seq_len={seq_len}, batch={batch}.")
    sizes = mesh_sizes(mesh, num_devices)
    impl = resolve_attention(config, seq_len, sizes, attention)
    if impl in STRATEGIES and sizes["sequence"] == 1:
        impl = "blockwise"  # context parallelism over one device is blockwise attention
    if impl not in STRATEGIES and sizes["sequence"] > 1:
        raise PlanError(
            f"a sequence axis of {sizes['sequence']} needs ring attention (or allgather, ulysses, hybrid), "
            f"not {impl!r}."
        )
    if seq_len % sizes["sequence"]:
        raise PlanError(f"seq_len {seq_len} is not divisible by sequence={sizes['sequence']}: change one of them.")
    A, W = _BYTES[config.dtype], _BYTES[config.param_dtype]
    notes: list[str] = []

    b, t = local_shape(("batch", "length"), (batch, seq_len), ACTIVATION_RULES, sizes)
    if batch % (sizes["data"] * sizes["fsdp"]):
        notes.append(
            f"batch {batch} does not divide data×fsdp={sizes['data'] * sizes['fsdp']}: some of those devices "
            "repeat the same sequences (raise the batch or move devices to the sequence axis)."
        )
    (n,) = local_shape(("heads",), (config.num_heads,), ACTIVATION_RULES, sizes)
    (k,) = local_shape(("kv_heads",), (config.num_kv_heads,), ACTIVATION_RULES, sizes)
    (f,) = local_shape(("mlp",), (config.intermediate_size,), ACTIVATION_RULES, sizes)
    (v,) = local_shape(("vocab",), (config.vocab_size,), ACTIVATION_RULES, sizes)
    d, h, L = config.hidden_size, config.head_dim, config.num_layers
    tokens = b * t

    local, layer_gathered, head_gathered, scanned_local = _param_counts(params, config, sizes)
    param_bytes = local * W
    grads = local * W
    optimizer = 2 * local * moment_bytes
    layer_grads = layer_gathered  # one layer's weight gradients (elements) before the reduce-scatter
    lora_saved = 0
    if lora is not None:
        trainable, frozen, layer_grads, layer_adapters = _lora_counts(params, config, sizes, lora)
        param_bytes = trainable * W + frozen * _BYTES[lora.base_dtype or config.param_dtype]
        grads = trainable * W
        optimizer = 2 * trainable * moment_bytes
        layer_gathered += layer_adapters
        lora_saved = tokens * A * lora.rank * len(lora.targets)  # x·A of each adapted kernel, per layer
        notes.append(
            f"LoRA rank {lora.rank} on {','.join(lora.targets)}: {trainable / 1e6:.1f}M trainable elements "
            f"per device (of {(trainable + frozen) / 1e6:.1f}M)."
        )

    # Per token, one layer: everything the backward reads when nothing is recomputed.
    full_layer = A * (4 * d + 2 * n * h + 2 * k * h + 3 * f) + 4 * n  # + fp32 LSE
    # Dense attention's fp32 [n, t, s] scores of one sequence (s: all keys; ring is never dense).
    scores = 4 * n * t * (seq_len if impl != "ring" else t)
    saved_per_layer = {
        "none": tokens * full_layer + (b * scores if impl in ("reference", "xla") else 0),
        "full": tokens * A * d,
        "dots": tokens * A * (3 * d + n * h + 2 * k * h + 2 * f) + (b * scores if impl in ("reference", "xla") else 0),
        "dots_with_no_batch_dims": tokens * A * (3 * d + n * h + 2 * k * h + 2 * f),
    }[remat]
    saved_per_layer += lora_saved if remat != "full" else 0
    # Embedding output and the final norm's input/output, once.
    activations = L * saved_per_layer + 3 * tokens * A * d

    cotangents = tokens * A * (2 * d + 2 * n * h + 2 * k * h + 2 * f)
    # Under remat the backward of one layer first rebuilds what the policy did not save.
    recompute = 0 if remat == "none" else max(0, tokens * full_layer - saved_per_layer)
    gathers = 0
    if sizes["fsdp"] > 1 or A != W:
        # This layer's weights and the next one's, gathered over fsdp and/or cast to the compute
        # dtype, plus this layer's full weight gradients before they are reduce-scattered.
        gathers = 2 * layer_gathered * A + layer_grads * W
    if sizes["fsdp"] > 1:
        notes.append("FSDP all-gathers one layer's weights at a time (and prefetches the next).")
    if A != W and lora is None:
        # XLA (TPU) hoists the compute-dtype cast of the scanned layers' stacked weights out of the layer
        # loop: a copy of every local layer weight in the compute dtype lives through the step.
        gathers += scanned_local * A
    if sizes["fsdp"] > 1 or A != W:
        # Beside the head the loss gathers (under logits): the embedding's gathered copy when untied, and the
        # full weight gradients of embedding and head (param dtype) before their reduce-scatter.
        heads = 1 if config.tie_word_embeddings else 2
        gathers += (heads - 1) * head_gathered * A
        if sizes["fsdp"] > 1 and (lora is None or lora.train_embeddings):
            gathers += heads * head_gathered * W
    layer_working = recompute + cotangents + gathers

    if impl in ("reference", "xla"):
        # scores, probabilities and their gradient for one layer, fp32.
        attention_ws = 3 * b * scores + b * t * seq_len
    else:
        cq = ck = max(1, min(config.attention_chunk, t // 2 if impl == "ring" and t % 2 == 0 else t))
        tile = 2 * 4 * b * n * cq * ck  # fp32 logits and probabilities of one chunk pair (dP and dS fuse)
        # Backward peak (attention.flash): chunk-major copies of q, dO, K, Kᵀ and V in the compute
        # dtype, fp32 dq/dk/dv accumulators and fp32 LSE and delta rows (the forward's state is smaller).
        acc = b * t * n * h * (2 * A + 4) + b * t * k * h * (3 * A + 8) + 2 * 4 * b * t * n
        attention_ws = tile + acc
        if impl in STRATEGIES:
            # The strategy's own buffers, as `sharding.cp_plan` sizes them (bytes do not depend on the
            # links): ring, the K/V blocks and fp32 dK/dV in flight; allgather, one layer's full K/V and
            # fp32 dK/dV; ulysses, the all-to-all buffers; hybrid, both at its group's sizes.
            plans = model_strategies(config, seq_len, batch, sizes, LINKS["tpu-v5p"], remat=remat != "none")
            (sp,) = [p for p in plans if p.strategy == impl]
            if not sp.feasible:
                raise PlanError(f"context_parallel {impl}: {sp.why_not}")
            attention_ws += sp.kv_bytes + sp.a2a_bytes
            if impl != "ring":
                notes.append(
                    f"context parallelism {impl}"
                    + (f" (Ulysses groups of {sp.ulysses_size})" if impl == "hybrid" else "")
                    + f": {sp.kv_bytes / GiB:.2f} GiB of K/V buffers, {sp.a2a_bytes / GiB:.2f} GiB of all-to-all "
                    "buffers."
                )
    positions = (seq_len if loss_chunk is None else min(loss_chunk, seq_len)) * t // seq_len
    # The loss's backward, one chunk at a time: the recomputed fp32 logits [b, c, v]. The softmax, its
    # gradient and the compute-dtype cast fuse into the two matmuls that read them, so one fp32 buffer
    # of the chunk is live (the TPU compiler's buffer assignment: one f32[b, c, v] value pair).
    loss_peak = 4 * b * max(1, positions) * v
    loss_peak += head_gathered * A if (sizes["fsdp"] > 1 or A != W) else 0  # the head gathered / cast
    # The loss's backward finishes before the first layer's backward starts: the two working sets take
    # turns in the same memory (their buffers share offsets in XLA's assignment), so the plan counts
    # the loss only where it is larger than a layer's recompute, cotangents and attention.
    logits = max(0, loss_peak - (recompute + cotangents + attention_ws))
    if loss_peak > 0:
        notes.append(
            f"logits / loss: {loss_peak / GiB:.2f} GiB at its peak (one chunk's fp32 logits"
            + (" and the gathered head" if (sizes["fsdp"] > 1 or A != W) else "")
            + "); it runs before the layers' backward and reuses their memory, so only "
            f"{logits / GiB:.2f} GiB beyond it is counted."
        )
    batch_bytes = 4 * 4 * tokens  # tokens, positions, segment ids, targets (int32)

    ndev = math.prod(sizes.values())
    desc = (
        f"memory plan: {seq_len:,} tokens × batch {batch}, mesh "
        + " ".join(f"{a}={sizes[a]}" for a in AXES)
        + f" ({ndev} devices), remat {remat}, attention {impl}, {config.param_dtype} params, "
        f"{config.dtype} compute, loss chunk {loss_chunk or 'none'}"
        + (f", LoRA r={lora.rank}" if lora is not None else "")
    )
    return MemoryPlan(
        params=param_bytes,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        layer_working=layer_working,
        attention=attention_ws,
        logits=logits,
        loss_peak=loss_peak,
        batch=batch_bytes,
        description=desc,
        notes=tuple(notes),
    )
