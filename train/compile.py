"""Compile a run's real train step for a TPU slice, or lower it for a GPU node, on a CPU-only host.

    python -m train compile --config configs/llama3-8b-1m.yaml --stage 1m --topology v5p-128 --json out.json
    python -m sharding compile ...        # the same command (`sharding.cli` hands it over to this one)

Per stage (all stages with steps > 0, or the one ``--stage``) the run config is resolved exactly as
``python -m train`` resolves it (`train.config.load_config` + ``--set``, `train.config.validate`
for the target's device count, `train.stage.build_engine`: model, mesh, shardings, optimizer,
LoRA), and the jitted ``train_step(state, batch)`` — forward, backward, AdamW update, donated
state — is lowered on abstract arguments inside ``attention.compile_target(...)``, so the trace
picks the target's attention kernel.

- **TPU** (``v5p-8``, ``v5e-256``, … see `sharding.topology`): deviceless compile through libtpu.
  XLA's per-device ``memory_analysis()`` (total = arguments + temp + outputs − aliased) is set
  beside the memory planner's estimate (`sharding.planner.plan_memory`) and the chip's HBM.
- **GPU** (``h100``, ``h200``, ``a100``): ``jax.export`` for CUDA (compiling for a GPU needs its
  driver), listing the custom calls lowered (Triton, Mosaic GPU, cuDNN). The mesh is one 8-GPU
  node when the config's mesh has a ``-1`` axis, else as many GPUs as the mesh names.

Exit status: 0 every compiled stage fits, 1 one does not, 2 bad input (config, stage, topology,
a mesh the slice cannot hold), with no ``--json`` file left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import export
from jax.errors import JaxRuntimeError
from jax.sharding import AxisType

from attention import choose_impl, choose_kernel, compile_target
from convert.atomic import atomic_file
from model.config import ConfigError
from model.params import abstract_params
from sharding.cp_plan import LINKS, resolve_context_parallel
from sharding.mesh import AXES, MeshConfig, MeshError
from sharding.planner import PlanError, plan_memory
from sharding.rules import batch_sharding
from sharding.topology import GpuTarget, TopologyError, TpuTopology, target, tpu_devices
from train.config import StagePlan, TrainConfig, load_config, validate
from train.stage import build_engine
from train.step import BATCH_KEYS

GiB = 1024**3
EXIT_DOES_NOT_FIT = 1
EXIT_BAD_INPUT = 2
# Custom calls a CUDA export may contain that jax.export would otherwise refuse (no stability promise).
GPU_CUSTOM_CALLS = ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2", "cudnn$fmha", "__cudnn$fmhaSoftmax",
                    "__cudnn$fmhaSoftmaxBackward")  # fmt: skip


def abstract_batch(mesh, batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch as sharded ``ShapeDtypeStruct`` leaves (what `train.data` yields)."""
    shape, sh = (batch, seq_len), batch_sharding(mesh, (batch, seq_len))
    dtype = {"loss_mask": jnp.float32}
    return {k: jax.ShapeDtypeStruct(shape, dtype.get(k, jnp.int32), sharding=sh) for k in BATCH_KEYS}


def gpu_device_count(cfg: TrainConfig, gpu: GpuTarget) -> int:
    """GPUs to lower for: one node when a mesh has a -1 axis, else the largest mesh the stages name."""
    meshes = [s.mesh or cfg.mesh for s in cfg.stages] or [cfg.mesh]
    sizes = [[getattr(m, a) for a in AXES] for m in meshes]
    if any(-1 in s for s in sizes):
        return gpu.devices_per_node
    return max(math.prod(s) for s in sizes)


def host_devices(count: int) -> list:
    """``count`` CPU devices to build a GPU target's mesh on: the export records only the device count.

    The model's sharding constraints need a concrete `Mesh`, so the host emulates the node
    (``--xla_force_host_platform_device_count``, set by `main` before jax starts a backend).
    """
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise TopologyError(
            f"lowering for {count} GPUs needs {count} host CPU devices but jax has {len(devices)}: run "
            "`python -m train compile` in a fresh process, or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={count}."
        )
    return devices[:count]


def _emulate_host_devices(count: int) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    have = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if have and int(have.group(1)) >= count:
        return
    kept = [f for f in flags.split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def custom_calls(mlir_text: str) -> dict[str, int]:
    """``{call target: count}`` of the custom calls in a lowered module's text."""
    names = re.findall(r'custom_call @([\w$.\-]+)|call_target_name = "([^"]+)"', mlir_text)
    return dict(Counter(a or b for a, b in names))


def compile_stage(cfg: TrainConfig, plan: StagePlan, tgt: TpuTopology | GpuTarget, devices) -> dict:
    """Compile (TPU) or lower (GPU) stage ``plan``'s train step; one result row (see the module docstring)."""
    mesh = jax.make_mesh(plan.mesh_shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
    s = plan.stage
    tpu = isinstance(tgt, TpuTopology)
    # context_parallel: auto → the planner's pick for the target (not the host's CPU devices).
    links = None if tpu else LINKS[tgt.name if tgt.name in LINKS else "h100"]
    m, _ = resolve_context_parallel(plan.model, s.seq_len, s.batch_size, mesh, links=links)
    engine = build_engine(m, plan.optim, mesh, total_steps=max(s.steps, 1), loss_chunk=cfg.loss_chunk, lora=cfg.lora)
    batch = abstract_batch(mesh, s.batch_size, s.seq_len)
    fn = engine.train_step.jitted(batch)
    platform = "tpu" if tpu else "gpu"
    cc = None if tpu else tgt.compute_capability
    q = jax.ShapeDtypeStruct((s.batch_size, s.seq_len, m.num_heads, m.head_dim), jnp.dtype(m.dtype))
    k = jax.ShapeDtypeStruct((s.batch_size, s.seq_len, m.num_kv_heads, m.head_dim), jnp.dtype(m.dtype))
    row = {
        "stage": plan.name,
        "topology": tgt.name,
        "platform": platform,
        "devices": math.prod(plan.mesh_shape),
        "mesh": dict(zip(AXES, plan.mesh_shape, strict=True)),
        "seq_len": s.seq_len,
        "batch_size": s.batch_size,
        "remat": m.remat_policy,
        "lora": cfg.lora is not None,
        "hbm_bytes": tgt.hbm_bytes,
    }
    start = time.perf_counter()
    with compile_target(platform, compute_capability=cc):
        impl = m.attention_impl if m.attention_impl != "auto" else choose_impl(q, k, mesh, platform=platform)
        if impl == "ring" and m.attention_impl == "auto":  # the model refines auto on a sequence-sharded mesh
            impl = m.context_parallel if m.context_parallel != "auto" else impl
        row["attention_impl"] = impl
        fused = impl not in ("reference", "xla")
        row["kernel"] = choose_kernel(m.attention_kernel, head_dim=m.head_dim, dtype=q.dtype) if fused else "-"
        try:
            if tpu:
                compiled = fn.lower(engine.abstract, batch).compile()
            else:
                checks = [export.DisabledSafetyCheck.custom_call(n) for n in GPU_CUSTOM_CALLS]
                exp = export.export(fn, platforms=["cuda"], disabled_checks=checks)(engine.abstract, batch)
        except (ValueError, NotImplementedError, JaxRuntimeError) as exc:
            # A kernel that does not lower for this target (e.g. Mosaic's block tiling): a result, not bad input.
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            row.update(compile_s=round(time.perf_counter() - start, 2), error=first[:400], fits=False,
                       xla_bytes_per_device=None, planner_bytes_per_device=None)  # fmt: skip
            return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    if not tpu:
        row.update(custom_calls=custom_calls(exp.mlir_module()), xla_bytes_per_device=None,
                   planner_bytes_per_device=None, fits=None)  # fmt: skip
        return row
    mem = compiled.memory_analysis()
    xla = {
        "argument": mem.argument_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
    }
    total = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"]
    planner = plan_memory(m, abstract_params(m, cfg.lora), s.seq_len, s.batch_size, row["mesh"], m.remat_policy,
                          loss_chunk=cfg.loss_chunk, lora=cfg.lora)  # fmt: skip
    row.update(
        xla_bytes=xla,
        xla_bytes_per_device=total,
        planner_bytes_per_device=int(planner.total),
        planner_ratio=round(planner.total / total, 4),
        fits=total <= tgt.hbm_bytes,
    )
    return row


def only_stage(cfg: TrainConfig, stage: str | None) -> TrainConfig:
    """``cfg`` with every stage but ``stage`` on a mesh any device count resolves (tensor=-1).

    The other stages still resolve θ and max positions for the chosen one, but their meshes (sized for
    the run's cluster, not this slice) must not stop it from compiling.
    """
    if stage is None:
        return cfg
    names = [s.name or f"stage{i + 1}" for i, s in enumerate(cfg.stages)]
    if stage not in names:
        raise ConfigError(f"--stage {stage!r} is not a stage of this config: use one of {', '.join(names)}.")
    anywhere = MeshConfig(data=1, fsdp=1, tensor=-1, sequence=1)
    stages = [
        s if n == stage else dataclasses.replace(s, mesh=anywhere) for s, n in zip(cfg.stages, names, strict=True)
    ]
    return dataclasses.replace(cfg, stages=tuple(stages))


def compile_run(cfg: TrainConfig, topology: str, stage: str | None = None, say=print) -> list[dict]:
    """Compile every selected stage of ``cfg`` for ``topology``; rows as `compile_stage` returns them."""
    tgt = target(topology)
    if isinstance(tgt, TpuTopology):
        devices = tpu_devices(tgt)
        count = len(devices)
    else:
        count = gpu_device_count(cfg, tgt)
        devices = host_devices(count)
    plans = validate(only_stage(cfg, stage), count)
    if stage is not None:
        chosen = [p for p in plans if p.name == stage]
    else:
        chosen = [p for p in plans if p.stage.steps > 0]
    rows = []
    for plan in chosen:
        say(f"{plan.name}: compiling for {tgt.name} ({count} devices, mesh "
            f"{','.join(f'{a}={n}' for a, n in zip(AXES, plan.mesh_shape, strict=True))}) ...")  # fmt: skip
        row = compile_stage(cfg, plan, tgt, devices)
        say(describe(row))
        rows.append(row)
    return rows


def describe(row: dict) -> str:
    """One stage's result as a few lines of text."""
    verb = "compiled" if row["platform"] == "tpu" else "lowered for CUDA"
    head = (f"{row['stage']} on {row['topology']}: {row['seq_len']:,} tokens × {row['batch_size']}, attention "
            f"{row['attention_impl']} (kernel {row['kernel']}), {verb} in {row['compile_s']:.1f} s")  # fmt: skip
    if "error" in row:
        return (f"{head}\n  DOES NOT COMPILE: {row['error']}\n  (a kernel that does not lower for "
                f"{row['platform']}: try --set model.attention_kernel=jnp)")  # fmt: skip
    if row["platform"] == "gpu":
        calls = ", ".join(f"{n} × {c}" for n, c in sorted(row["custom_calls"].items())) or "none"
        return f"{head}\n  custom calls: {calls}"
    x = row["xla_bytes"]
    g = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    return (
        f"{head}\n  XLA per device GiB: arguments {g(x['argument'])}, temp {g(x['temp'])}, outputs "
        f"{g(x['output'])}, aliased {g(x['alias'])}, total {g(row['xla_bytes_per_device'])}\n"
        f"  planner {g(row['planner_bytes_per_device'])} GiB (planner / XLA {row['planner_ratio']:.2f}); HBM "
        f"{g(row['hbm_bytes'])} GiB: {'fits' if row['fits'] else 'DOES NOT FIT'}"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train compile",
        description="Compile a run's train step for a TPU slice (memory per device) or lower it for a GPU node.",
    )
    p.add_argument("--config", required=True, help="YAML run config (as python -m train takes it)")
    p.add_argument("--stage", help="compile only this stage (default: every stage with steps > 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as in python -m train (repeatable)")  # fmt: skip
    p.add_argument("--topology", required=True, help="v5p-8 … v5p-1024, v4-8, v5e-8, v6e-256, …, or h100/h200/a100")
    p.add_argument("--json", help="write the rows (one per compiled stage) to this JSON file")
    return p


def deviceless_setup() -> None:
    """Keep jax on the CPU backend and libtpu off the TPU metadata server: the targets are abstract devices.

    Takes effect when no backend has started yet (a CLI run); an explicit ``JAX_PLATFORMS`` wins.
    """
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    deviceless_setup()
    try:
        tgt = target(args.topology)  # a bad name fails before the config is read
        cfg = load_config(args.config, args.overrides)
        if isinstance(tgt, GpuTarget):
            _emulate_host_devices(gpu_device_count(cfg, tgt))
        rows = compile_run(cfg, args.topology, args.stage)
    except (ConfigError, MeshError, PlanError, TopologyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        with atomic_file(args.json) as fh:
            json.dump(rows, fh, indent=1)
    return EXIT_DOES_NOT_FIT if any(r["fits"] is False for r in rows) else 0


__all__ = [
    "abstract_batch",
    "compile_run",
    "compile_stage",
    "custom_calls",
    "describe",
    "deviceless_setup",
    "main",
    "only_stage",
]
