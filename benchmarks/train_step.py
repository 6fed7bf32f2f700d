"""Train-step throughput/MFU on the CPU mesh and compile time vs depth (scanned or not).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.train_step

Part 1 times the jitted, sharded train step of the demo model (configs/demo.yaml) on the
emulated 8-device mesh (data=2 × sequence=4, zigzag ring attention) at each demo stage's
(seq_len, batch): tokens/s over ``--steps`` steps after one warm-up, and MFU against the
nominal CPU peak of `train.metrics` (model FLOPs from `train.flops`).

With ``--lora-rank R`` each stage is timed twice, full fine-tuning and LoRA (rank R on
``--lora-targets``, embeddings and norms trained as in LongLoRA), from the same base and batches.

Part 2 lowers and compiles the same step for the demo model at 2 and 32 layers, with layers
under ``lax.scan`` and unrolled, on abstract inputs (nothing is initialised), and reports the
compile wall time: scanning keeps it flat in depth, unrolling grows with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from model.lora import LoraConfig
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding
from train.config import load_config, validate
from train.data import make_iterator
from train.flops import train_step_flops
from train.metrics import device_peak_tflops, mfu
from train.stage import build_engine
from train.step import BATCH_KEYS


def time_steps(plan, loss_chunk: int, steps: int, lora: LoraConfig | None = None) -> dict:
    """Tokens/s and MFU of the stage's train step (after one warm-up step that compiles)."""
    mesh = make_mesh(plan.mesh)
    stage = plan.stage
    engine = build_engine(plan.model, plan.optim, mesh, total_steps=steps + 1, loss_chunk=loss_chunk, lora=lora)
    state, step = engine.init(jax.random.key(0)), engine.train_step
    it = make_iterator(plan.data, stage.seq_len, stage.batch_size, 0, layout=plan.layout,
                       num_shards=dict(mesh.shape)["sequence"], pose=stage.pose)  # fmt: skip
    batches = [next(it) for _ in range(steps + 1)]
    t0 = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches[1:]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    cpu = (time.process_time() - c0) / steps  # CPU seconds of all threads: robust to other jobs on the box
    peak, _ = device_peak_tflops()
    flops = train_step_flops(plan.model, stage.seq_len, stage.batch_size)
    return {
        "stage": plan.name,
        "mode": "full" if lora is None else f"lora r={lora.rank} {','.join(lora.targets)}",
        "seq_len": stage.seq_len,
        "batch": stage.batch_size,
        "first_step_s": first,
        "step_s": dt,
        "cpu_s_per_step": cpu,
        "tokens_per_s": stage.batch_size * stage.seq_len / dt,
        "model_gflop_per_step": flops / 1e9,
        "mfu": mfu(flops, dt, jax.device_count(), peak),
    }


def compile_time(plan, num_layers: int, scan: bool, loss_chunk: int) -> float:
    """Seconds to lower and compile the train step for ``num_layers`` (scanned or unrolled)."""
    cfg = plan.model.replace(num_layers=num_layers, scan_layers=scan)
    mesh = make_mesh(plan.mesh)
    engine = build_engine(cfg, plan.optim, mesh, total_steps=10, loss_chunk=loss_chunk)
    step = engine.train_step
    b, t = plan.stage.batch_size, plan.stage.seq_len
    dtypes = {"loss_mask": np.float32}
    batch = {k: jax.ShapeDtypeStruct((b, t), dtypes.get(k, np.int32), sharding=batch_sharding(mesh, (b, t)))
             for k in BATCH_KEYS}  # fmt: skip
    t0 = time.perf_counter()
    step.jitted(batch).lower(engine.abstract, batch).compile()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", default="2,32")
    parser.add_argument("--no-unscanned", action="store_true", help="skip the unrolled compiles")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--stages", help="comma-separated stage names to time (default: all)")
    parser.add_argument("--lora-rank", type=int, help="also time LoRA at this rank beside full fine-tuning")
    parser.add_argument("--lora-targets", default="q,k,v,o", help="LoRA targets (default q,k,v,o)")
    parser.add_argument("--no-compile", action="store_true", help="skip part 2 (compile time vs depth)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    plans = validate(cfg, jax.device_count())
    if args.stages:
        plans = [p for p in plans if p.name in args.stages.split(",")]
    modes = [None]
    if args.lora_rank:
        modes.append(LoraConfig(rank=args.lora_rank, targets=tuple(args.lora_targets.split(","))))
    rows = [time_steps(p, cfg.loss_chunk, args.steps, lora) for p in plans for lora in modes]
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}")
    print("| stage | mode | seq × batch | step (s) | CPU s/step | tokens/s | model GFLOP/step | MFU (CPU nominal) "
          "| first step (s) |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['mode']} | {r['seq_len']} × {r['batch']} | {r['step_s']:.3f} | "
              f"{r['cpu_s_per_step']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | "
              f"{r['model_gflop_per_step']:.2f} | {r['mfu']:.2%} | {r['first_step_s']:.1f} |")  # fmt: skip
    compiles = []
    for scan in () if args.no_compile else (True,) if args.no_unscanned else (True, False):
        for n in (int(x) for x in args.layers.split(",")):
            s = compile_time(plans[0], n, scan, cfg.loss_chunk)
            compiles.append({"layers": n, "scan_layers": scan, "compile_s": s})
            print(f"compile, {n} layers, {'scanned' if scan else 'unrolled'}: {s:.1f} s", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"devices": jax.device_count(), "steps": rows, "compile": compiles}, fh, indent=1)


if __name__ == "__main__":
    main()
