"""One prepared GPU benchmark (under 8 minutes on one H100/H200): attention kernels, train-step MFU, longest fit.

    python -m benchmarks.gpu --out DIR            # on the GPU machine
    python -m benchmarks.gpu --out DIR --smoke    # tiny sizes, CPU, end to end (Pallas in interpret mode)

Parts, all on one device, printed as one table and written to ``DIR/gpu_benchmark.json``:

(a) attention forward+backward, bf16, causal, 32 query / 8 kv heads, head_dim 128, at 8K/16K/32K:
    cuDNN flash (``jax.nn.dot_product_attention(implementation="cudnn")``) against ringllama
    blockwise with each local kernel (``jnp``, ``pallas`` = Mosaic GPU on Hopper, ``triton``) and ring
    attention on a 1-device ring.
    TFLOP/s count causal FLOPs (half the dense ``4·t²·n·h``) × 3.5 for forward + backward
    (the backward's 5 matmuls to the forward's 2). Target: within 10% of cuDNN.
(b) Llama-3.2-1B shapes, random weights, one train step at 8K, bf16 compute, fp32 master weights,
    full remat: tokens/s and MFU (model FLOPs of `train.flops` over the bf16 dense peak of
    `train.metrics`). Target ≥ 40%.
(c) the longest sequence whose train step fits the GPU (batch 1, full remat), trying 256K, 128K,
    64K, 32K: lengths the memory planner (`sharding.planner`) says will not fit are skipped, the
    first one it accepts runs one real step (an out-of-memory error moves down a length).
    Target ≥ 128K.

The measured Pallas TFLOP/s at the longest length is printed as the ``--kernel-tflops`` to give
``python -m sharding plan`` (`sharding.comm`). The GPU image has no ``datasets``: importing it is
blocked here, so the smoke run proves the script does not need it.
"""

from __future__ import annotations

import os
import sys

sys.modules.setdefault("datasets", None)  # the GPU image lacks it: any import of it fails here too
# "Fits one GPU" means the device's memory, not JAX's default 75% preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import model  # noqa: E402
from attention import attention, choose_kernel  # noqa: E402
from convert.atomic import atomic_file  # noqa: E402
from sharding.mesh import MeshConfig, make_mesh  # noqa: E402
from sharding.planner import plan_memory  # noqa: E402
from sharding.rules import axis_rules  # noqa: E402
from train.flops import train_step_flops  # noqa: E402
from train.metrics import device_peak_tflops, mfu  # noqa: E402
from train.optim import OptimConfig  # noqa: E402
from train.stage import build_engine  # noqa: E402
from train.step import BATCH_KEYS  # noqa: E402

FULL = dict(seqs=(8192, 16384, 32768), heads=32, kv_heads=8, head_dim=128, reps=5, model="llama3.2-1b",
            train_seq=8192, longest=(262144, 131072, 65536, 32768), steps=3)  # fmt: skip
SMOKE = dict(seqs=(256,), heads=4, kv_heads=2, head_dim=32, reps=1, model="tiny", train_seq=256,
             longest=(1024, 512), steps=1)  # fmt: skip


def _best_time(fn, args, reps: int) -> tuple[float, float]:
    """(compile + first call seconds, best of ``reps`` timed calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best


def attention_variants(on_gpu: bool):
    """name → ``f(q, k, v) -> out`` for part (a)."""
    ring_mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=1), devices=jax.devices()[:1])

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    variants = {
        "blockwise/jnp": lambda q, k, v: attention(q, k, v, impl="blockwise", kernel="jnp"),
        # pallas: the target's Pallas kernel (Mosaic GPU on Hopper); triton: the pre-Hopper kernel beside it.
        "blockwise/pallas": lambda q, k, v: attention(q, k, v, impl="blockwise", kernel="pallas"),
        "blockwise/triton": lambda q, k, v: attention(q, k, v, impl="blockwise", kernel="triton"),
        "ring1/jnp": axis_rules(ring_mesh)(
            lambda q, k, v: attention(q, k, v, impl="ring", mesh=ring_mesh, kernel="jnp")
        ),
        "ring1/pallas": axis_rules(ring_mesh)(
            lambda q, k, v: attention(q, k, v, impl="ring", mesh=ring_mesh, kernel="pallas")
        ),
    }
    return {"cudnn": cudnn if on_gpu else None} | variants


def bench_attention(sizes: dict, on_gpu: bool, deadline: float) -> list[dict]:
    rows = []
    n, kh, h = sizes["heads"], sizes["kv_heads"], sizes["head_dim"]
    for t in sizes["seqs"]:
        keys = jax.random.split(jax.random.key(t), 4)
        q = jax.random.normal(keys[0], (1, t, n, h), jnp.bfloat16)
        k = jax.random.normal(keys[1], (1, t, kh, h), jnp.bfloat16)
        v = jax.random.normal(keys[2], (1, t, kh, h), jnp.bfloat16)
        do = jax.random.normal(keys[3], (1, t, n, h), jnp.bfloat16)
        flops = 3.5 * 2.0 * t * t * n * h  # causal forward 2·t²·n·h, ×3.5 with the backward
        for name, fn in attention_variants(on_gpu).items():
            if fn is None or time.monotonic() > deadline:
                why = "skipped: not on a GPU" if fn is None else "skipped: time budget"
                rows.append(dict(part="a", seq=t, variant=name, status=why))
                continue

            def fwd_bwd(q, k, v, do, fn=fn):
                out, vjp = jax.vjp(fn, q, k, v)
                return out, vjp(do)

            try:
                first, best = _best_time(jax.jit(fwd_bwd), (q, k, v, do), sizes["reps"])
            except Exception as exc:  # a kernel that does not compile here is a result, not a crash
                rows.append(dict(part="a", seq=t, variant=name, status=f"failed: {type(exc).__name__}: {exc}"[:300]))
                continue
            rows.append(dict(part="a", seq=t, variant=name, status="ok", first_s=first, best_s=best,
                             tflops=flops / best / 1e12))  # fmt: skip
    return rows


def _step_inputs(cfg, seq: int, mesh):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.arange(seq, dtype=np.int32)[None],
        "segment_ids": np.zeros((1, seq), np.int32),
        "loss_mask": np.ones((1, seq), np.float32),
    }
    return {k: batch[k] for k in BATCH_KEYS}


def _train_cfg(name: str, on_gpu: bool):
    # bf16 compute with fp32 master weights, remat of whole layers; attention as `auto` picks it
    # (on GPU: the Pallas kernel, since the train step passes explicit positions).
    return model.preset(name, dtype="bfloat16" if on_gpu else "float32", remat_policy="full")


def bench_train_step(sizes: dict, on_gpu: bool) -> dict:
    cfg = _train_cfg(sizes["model"], on_gpu)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=1), devices=jax.devices()[:1])
    optim = OptimConfig()
    seq, steps = sizes["train_seq"], sizes["steps"]
    engine = build_engine(cfg, optim, mesh, total_steps=steps + 1)
    state, step = engine.init(jax.random.key(0)), engine.train_step
    batch = _step_inputs(cfg, seq, mesh)
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t0) / steps
    peak, peak_note = device_peak_tflops()
    flops = train_step_flops(cfg, seq, 1)
    return dict(part="b", model=sizes["model"], seq=seq, status="ok", first_s=first, step_s=dt,
                attention=f"{cfg.attention_impl}, kernel {choose_kernel(cfg.attention_kernel)}",
                tokens_per_s=seq / dt, mfu=mfu(flops, dt, 1, peak), peak=peak_note,
                loss=float(metrics["loss"]))  # fmt: skip


def bench_longest(sizes: dict, on_gpu: bool, deadline: float) -> dict:
    """Longest candidate whose train step runs: the memory planner skips lengths it predicts will not
    fit (one compile each would cost minutes), then one real step decides."""
    cfg = _train_cfg(sizes["model"], on_gpu)
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1, sequence=1)
    mesh = make_mesh(mesh_cfg, devices=jax.devices()[:1])
    optim = OptimConfig()
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    tried = []
    for seq in sizes["longest"]:
        if time.monotonic() > deadline:
            tried.append(dict(seq=seq, status="skipped: time budget"))
            continue
        cfg_seq = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, seq))
        planned = plan_memory(cfg_seq, model.abstract_params(cfg_seq), seq, 1, mesh_cfg, "full", num_devices=1)
        gib = planned.total / 2**30
        if limit is not None and not planned.fits(limit):
            tried.append(dict(seq=seq, status="planner: does not fit", planned_gib=gib))
            continue
        try:
            engine = build_engine(cfg_seq, optim, mesh, total_steps=2)
            state, step = engine.init(jax.random.key(0)), engine.train_step
            t0 = time.perf_counter()
            state, metrics = step(state, _step_inputs(cfg_seq, seq, mesh))
            jax.block_until_ready(metrics)
            tried.append(dict(seq=seq, status="ran", planned_gib=gib, first_step_s=time.perf_counter() - t0))
            del state
            return dict(part="c", model=sizes["model"], status="ok", longest=seq, tried=tried)
        except Exception as exc:  # out of memory at compile or run time: try the next length down
            tried.append(dict(seq=seq, status=f"failed: {type(exc).__name__}: {exc}"[:300], planned_gib=gib))
            gc.collect()  # drop the failed attempt's buffers before the next length
    return dict(part="c", model=sizes["model"], status="none fit", longest=None, tried=tried)


def table(results: dict) -> str:
    lines = [f"{'part':<5}{'case':<28}{'result':>22}  target"]
    cudnn = {r["seq"]: r["tflops"] for r in results["attention"] if r["variant"] == "cudnn" and r["status"] == "ok"}
    for r in results["attention"]:
        case = f"{r['seq']} {r['variant']}"
        if r["status"] != "ok":
            lines.append(f"{'a':<5}{case:<28}{r['status'][:60]:>22}")
            continue
        target = ""
        if r["variant"] != "cudnn" and r["seq"] in cudnn:
            ratio = r["tflops"] / cudnn[r["seq"]]
            target = f"{ratio:.0%} of cuDNN ({'met' if ratio >= 0.9 else 'not met'}: ≥ 90%)"
        lines.append(f"{'a':<5}{case:<28}{r['tflops']:>14.4g} TFLOP/s  {target}")
    b = results["train_step"]
    if b.get("status") == "ok":
        met = "met" if b["mfu"] >= 0.4 else "not met"
        lines.append(f"{'b':<5}{b['model'] + ' ' + str(b['seq']) + ' step':<28}"
                     f"{b['tokens_per_s']:>11.0f} tokens/s  MFU {b['mfu']:.1%} ({met}: ≥ 40%)")  # fmt: skip
    else:
        lines.append(f"{'b':<5}{'train step':<28}{b.get('status', '')[:60]:>22}")
    c = results["longest"]
    longest = c.get("longest")
    met = "met" if longest and longest >= 131072 else "not met"
    lines.append(f"{'c':<5}{c.get('model', '') + ' longest fit':<28}{str(longest):>22}  ({met}: ≥ 131072)")
    if results.get("kernel_tflops_for_planner"):
        lines.append(f"planner: python -m sharding plan ... --kernel-tflops {results['kernel_tflops_for_planner']:.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", dest="out_dir", required=True, help="directory for gpu_benchmark.json (created)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU): check the script end to end")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this, default 420")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"error: {args.out_dir} exists and is not a directory: give a directory.", file=sys.stderr)
        return 2
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.smoke:
        print("error: no GPU here (jax backend is cpu): run on the GPU machine, or pass --smoke.", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    start = time.monotonic()
    deadline = start + args.budget_s
    results = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "smoke": args.smoke}
    results["attention"] = bench_attention(sizes, on_gpu, deadline)
    try:
        results["train_step"] = bench_train_step(sizes, on_gpu)
    except Exception as exc:
        results["train_step"] = dict(part="b", status=f"failed: {type(exc).__name__}: {exc}"[:300])
    results["longest"] = bench_longest(sizes, on_gpu, deadline)
    pallas = [r for r in results["attention"] if r["variant"] == "blockwise/pallas" and r["status"] == "ok"]
    if pallas:
        results["kernel_tflops_for_planner"] = max(pallas, key=lambda r: r["seq"])["tflops"]
    results["wall_s"] = time.monotonic() - start
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "gpu_benchmark.json")
    with atomic_file(path) as f:
        json.dump(results, f, indent=1)
    print(table(results))
    print(f"wall {results['wall_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
