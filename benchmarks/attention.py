"""Causal attention fwd+bwd: dense reference, blockwise, three ring variants and the `ringattention` package.

    python -m benchmarks.attention --seq-lens 8k,16k,32k,64k --json benchmarks/results/attention.json

(The script sets ``--xla_force_host_platform_device_count=8`` itself when XLA_FLAGS is unset.)

Each case jit-compiles ``grad(sum(attention(q, k, v) · do))`` w.r.t. q, k, v and reports:

- ``temp MiB``: ``compiled.memory_analysis().temp_size_in_bytes`` of the per-device program
  (a ``shard_map`` program is per device), i.e. scratch beyond arguments and outputs;
- ``XLA GFLOP``: ``compiled.cost_analysis()["flops"]``, also per device program. XLA's CPU cost
  analysis counts a loop body once (about one chunk pair here) and a ``cond`` by a branch, so it
  cannot show skipped work and is identical for every ring position; exact only for ``reference``;
- ``attn GFLOP/dev``: executed attention FLOPs per device, counted at run time. The kernels
  report every executed q-chunk × kv-chunk block through `attention.instrument`; each costs
  ``14·b·cq·ck·n·h`` FLOPs fwd+bwd (2 matmuls forward, 5 backward). The skip pattern depends
  only on the chunk grid (S/chunk, ring size, layout), so the counting run uses the same grid
  scaled down to 16-token chunks (cheap); ``--check-counts`` also counts at full size for the
  smallest S and fails if the two disagree. ``max/min`` is over the ring positions;
- ``wall s``: best of ``--repeats`` timed runs after ``--warmup`` untimed ones, the cases of one S
  interleaved so that load from other jobs affects them alike. On the emulated mesh all 8
  "devices" share the box's cores, so wall time measures total work, not per-device latency;
- ``cpu s``: best process CPU time (all threads) of the same runs: the work done, less sensitive
  than wall time to other jobs on a shared box (and to how well a case keeps the cores busy).

Cases: ``reference`` (dense, one device; run only where its temp memory fits ``--dense-limit-gib``),
``blockwise`` (one device, at S and at S/8 for the memory target), ``ring-classic`` (contiguous
layout, every hop and chunk pair computed and masked), ``ring-contiguous`` and ``ring-zigzag``
(hops and chunk pairs hidden by the causal mask skipped); ``package`` and ``package-ring``: the
`ringattention` PyPI package (haoliuhl, 0.1.2, as used by LWM/EasyLM) on a one-device mesh (its
blockwise kernel) and on the 8-device mesh (contiguous layout; it has no GQA, so K/V are repeated
to the query heads first; causal via ``causal_block_size=1``, which skips chunk pairs above the
diagonal). Install it with ``pip install -e '.[bench]'`` (or ``pip install --no-deps
ringattention==0.1.2``); ``import ringattention`` fails on jax ≥ 0.5 (``jax.lib.xla_bridge``), so
`_load_package` loads its ``ringattention_jax.py`` alone.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attention import instrument  # noqa: E402
from attention.blockwise import blockwise_attention  # noqa: E402
from attention.layout import layout_positions  # noqa: E402
from attention.masks import default_positions, make_mask  # noqa: E402
from attention.reference import reference_attention  # noqa: E402
from attention.strategies import sharded_attention  # noqa: E402
from convert.atomic import atomic_file  # noqa: E402
from sharding import MeshConfig, axis_rules, make_mesh  # noqa: E402

RING_CASES = {
    "ring-classic": ("contiguous", False),
    "ring-contiguous": ("contiguous", True),
    "ring-zigzag": ("zigzag", True),
}
PACKAGE_CASES = ("package", "package-ring")
COUNT_CHUNK = 16


def _load_package():
    """The `ringattention` package's JAX module, loaded from its file (its ``__init__`` needs old jax)."""
    try:
        path = importlib.metadata.distribution("ringattention").locate_file("ringattention/ringattention_jax.py")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            "benchmarks.attention: the package cases need the ringattention package: "
            "pip install -e '.[bench]' (or pip install --no-deps ringattention==0.1.2), or drop them from --cases."
        ) from None
    spec = importlib.util.spec_from_file_location("ringattention_jax", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package_attend(args, mesh, chunk: int):
    """``(q, k, v) -> out`` through the package's ``ring_attention`` inside ``shard_map`` on ``mesh``."""
    module = _load_package()
    kwargs = dict(
        causal_block_size=1,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )
    spec = P(None, "sequence")

    def shard(q, k, v):
        return module.ring_attention(q, k, v, None, None, None, "sequence", True, kwargs)

    def attend(q, k, v):
        groups = args.heads // args.kv_heads  # no GQA in the package: K/V repeated to the query heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return jax.shard_map(shard, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)

    return attend


def _auto_mesh(devices: int):
    # The package's shard_map body uses plain jnp ops on the manual axis: an Auto mesh axis.
    return jax.make_mesh((devices,), ("sequence",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])


def _parse_lengths(text: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.lower().endswith("k") else int(x) for x in text.split(",") if x]


def _grad_fn(kind: str, args, mesh, seq: int, chunk: int, counter=None):
    """``(q, k, v, do) -> (dq, dk, dv)`` for one case (blockwise and ring count their work into ``counter``)."""
    b = args.batch

    if kind == "reference":

        def attend(q, k, v):
            pos = default_positions(b, seq)  # traced iota: no [S, S] mask constant in the program
            return reference_attention(q, k, v, make_mask(pos, pos, None, None, True), args.head_dim**-0.5)[0]
    elif kind in PACKAGE_CASES:
        attend = _package_attend(args, mesh, chunk)
    elif kind == "blockwise":

        def attend(q, k, v):
            return blockwise_attention(q, k, v, causal=True, chunk_size=chunk, counter=counter)[0]
    else:
        layout, skip = RING_CASES[kind]
        pos = layout_positions(b, seq, mesh.shape["sequence"], layout)

        @axis_rules(mesh)
        def attend(q, k, v):
            return sharded_attention(
                q,
                k,
                v,
                mesh=mesh,
                q_positions=pos,
                kv_positions=pos,
                chunk_size=chunk,
                skip_masked=skip,
                counter=counter,
            )

    def grads(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * do), argnums=(0, 1, 2))(q, k, v)

    return grads


def _inputs(args, seq: int, mesh):
    rng = np.random.default_rng(0)
    shapes = [(args.batch, seq, h, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads, args.heads)]
    arrays = [rng.standard_normal(s, np.float32) for s in shapes]
    if mesh is None:
        return [jax.device_put(a, jax.devices()[0]) for a in arrays]
    return [jax.device_put(a, NamedSharding(mesh, P(None, "sequence"))) for a in arrays]


def _count_blocks(kind: str, args, mesh, seq: int, chunk: int) -> list[int]:
    """Executed fwd chunk blocks per ring position (the backward executes the same set)."""
    with instrument.count_work() as counts:
        fn = jax.jit(_grad_fn(kind, args, mesh, seq, chunk, counts))
        jax.block_until_ready(fn(*_inputs(args, seq, mesh)))
        jax.effects_barrier()
        ring = mesh.shape["sequence"] if mesh is not None else 1
        return [counts.get(("chunk_fwd", r), 0) for r in range(ring)]


def measure(kind: str, args, mesh, seq: int, chunk: int) -> tuple[dict, object, list]:
    """Compile one case; memory, XLA cost and executed blocks. Returns ``(row, compiled, inputs)``."""
    devices = mesh.shape["sequence"] if mesh is not None and kind != "package" else 1
    local = seq // devices
    row: dict = {"case": kind, "seq": seq, "devices": devices, "attn_flops_per_device": []}
    inputs = _inputs(args, seq, mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(_grad_fn(kind, args, mesh, seq, chunk)).lower(*inputs).compile()
    row["compile_s"] = time.perf_counter() - t0
    row["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    row["xla_flops"] = float(cost.get("flops", float("nan")))
    if kind == "reference":
        row["attn_flops_per_device"] = [row["xla_flops"]]  # dense: no loops or conds, XLA's count is exact
    elif args.run and kind not in PACKAGE_CASES:
        # Executed attention blocks per device, from the same chunk grid at 16-token chunks.
        cq = min(chunk, local // 2) if kind.startswith("ring") else min(chunk, seq)
        scale = cq // COUNT_CHUNK if cq >= COUNT_CHUNK else 1
        blocks = _count_blocks(kind, args, mesh, seq // scale, cq // scale)
        if args.check_counts and seq == min(_parse_lengths(args.seq_lens)):
            full = _count_blocks(kind, args, mesh, seq, chunk)
            if full != blocks:
                raise SystemExit(f"{kind} at {seq}: scaled block counts {blocks} != full-size counts {full}")
        per_block = 14 * args.batch * cq * cq * args.heads * args.head_dim
        row["blocks_per_device"] = blocks
        row["attn_flops_per_device"] = [b * per_block for b in blocks]
    return row, compiled, inputs


def time_cases(prepared: list, args) -> None:
    """Best-of-``repeats`` wall time per case, cases interleaved so load drift hits all alike."""
    runnable = [
        (row, compiled, inputs)
        for row, compiled, inputs in prepared
        if args.run
        and row["seq"] <= args.time_up_to
        and (row["case"] != "reference" or row["temp_bytes"] <= args.dense_limit_gib * 2**30)
    ]
    for _ in range(args.warmup):
        for _, compiled, inputs in runnable:
            jax.block_until_ready(compiled(*inputs))
    for _ in range(args.repeats):
        for row, compiled, inputs in runnable:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*inputs))
            row["wall_s"] = min(row.get("wall_s", float("inf")), time.perf_counter() - t0)
            row["cpu_s"] = min(row.get("cpu_s", float("inf")), time.process_time() - c0)


def _fmt_table(rows: list[dict]) -> str:
    head = "| S | case | devices | temp MiB/dev | XLA GFLOP/dev | attn GFLOP/dev (max) | max/min | attn GFLOP total"
    head += " | chunk | wall s | cpu s |"
    lines = [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        flops = r["attn_flops_per_device"]
        if flops:
            counted = f"{max(flops) / 1e9:,.1f} | {max(flops) / min(flops):.2f} | {sum(flops) / 1e9:,.1f}"
        else:
            counted = "– | – | –"
        wall = f"{r['wall_s']:.2f} | {r['cpu_s']:.2f}" if "wall_s" in r else "not run | –"
        lines.append(
            f"| {r['seq'] // 1024}K | {r['case']} | {r['devices']} | {r['temp_bytes'] / 2**20:,.1f} | "
            f"{r['xla_flops'] / 1e9:,.1f} | {counted} | {r.get('chunk', '')} | {wall} |"
        )
    return "\n".join(lines)


def _targets(rows: list[dict]) -> list[str]:
    by = {(r["case"], r["seq"]): r for r in rows}
    out = []
    for seq in sorted({r["seq"] for r in rows}):
        zig, classic, small = (
            by.get(("ring-zigzag", seq)),
            by.get(("ring-classic", seq)),
            by.get(("blockwise at S/8", seq)),
        )
        for ours, theirs, limit in (
            ("ring-zigzag", "package-ring", 0.70),
            ("blockwise", "package", 0.70),
            ("ring-zigzag", "blockwise", 1.15),
        ):
            a, b = by.get((ours, seq)), by.get((theirs, seq))
            if a and b and "wall_s" in a and "wall_s" in b:
                wall, cpu = a["wall_s"] / b["wall_s"], a["cpu_s"] / b["cpu_s"]
                verdict = "met" if wall <= limit else "not met"
                out.append(
                    f"S={seq // 1024}K: {ours} / {theirs} fwd+bwd wall {wall:.2f}× (target ≤ {limit}: {verdict}), "
                    f"cpu {cpu:.2f}×"
                )
        if zig and small:
            zt, st = zig["temp_bytes"], small["temp_bytes"]
            out.append(
                f"S={seq // 1024}K: ring-zigzag temp/dev {zt / 2**20:.1f} MiB = {zt / st:.2f} × "
                f"blockwise at S/8 ({st / 2**20:.1f} MiB)"
            )
        if zig and classic and zig["attn_flops_per_device"] and classic["attn_flops_per_device"]:
            zf, cf = zig["attn_flops_per_device"], classic["attn_flops_per_device"]
            line = f"S={seq // 1024}K: zigzag max/min {max(zf) / min(zf):.3f}, total FLOPs "
            line += f"{sum(zf) / sum(cf):.3f} × classic"
            if "wall_s" in zig and "wall_s" in classic:
                line += f", fwd+bwd {classic['wall_s'] / zig['wall_s']:.2f}× faster than classic"
            out.append(line)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", default="8k,16k,32k", help="comma list, e.g. 8k,16k,32k,64k")
    parser.add_argument("--cases", default="reference,blockwise,ring-classic,ring-contiguous,ring-zigzag")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512, help="chunk of blockwise")
    parser.add_argument("--ring-chunk", type=int, default=None, help="chunk of our ring cases (default --chunk)")
    parser.add_argument("--package-chunk", type=int, default=None, help="chunk of the package cases (default --chunk)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation is separate)")
    parser.add_argument("--time-up-to", default="64k", help="time only sequence lengths up to this")
    parser.add_argument("--no-run", dest="run", action="store_false", help="compile only: memory and XLA FLOPs")
    parser.add_argument("--check-counts", action="store_true", help="verify scaled block counts at full size")
    parser.add_argument("--dense-limit-gib", type=float, default=8.0, help="run the dense reference only below this")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    args.time_up_to = _parse_lengths(args.time_up_to)[0]
    if jax.device_count() < 8:
        raise SystemExit(
            "benchmarks.attention needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=8))
    meshes = {"package": _auto_mesh(1), "package-ring": _auto_mesh(8)}
    ring_chunk = args.ring_chunk or args.chunk
    cases = args.cases.split(",")
    rows = []
    for seq in _parse_lengths(args.seq_lens):
        prepared = []
        for kind in cases:
            ring = kind.startswith("ring") or kind == "package-ring"
            chunk = args.package_chunk or args.chunk if kind in PACKAGE_CASES else ring_chunk if ring else args.chunk
            prepared.append(measure(kind, args, meshes.get(kind, mesh if ring else None), seq, chunk))
            prepared[-1][0]["chunk"] = chunk
        if "blockwise" in cases:
            # Memory target: one device holding S/8 tokens with blockwise attention.
            prepared.append(measure("blockwise", args, None, seq // 8, args.chunk))
            prepared[-1][0].update(case="blockwise at S/8", seq=seq, chunk=args.chunk)
        time_cases(prepared, args)
        rows += [row for row, _, _ in prepared]
        del prepared
        print(_fmt_table([r for r in rows if r["seq"] == seq]), flush=True)
        _write_json(args, rows)
    print()
    print(
        f"shapes: batch {args.batch}, {args.heads} query heads, {args.kv_heads} kv heads, head_dim {args.head_dim}, "
        f"chunk {args.chunk} (ring {ring_chunk}, package {args.package_chunk or args.chunk}), fp32, causal, fwd+bwd; "
        f"jax {jax.__version__} on {platform.machine()} "
        f"({os.cpu_count()} cores, 8 emulated devices)"
    )
    print(_fmt_table(rows))
    for line in _targets(rows):
        print(line)
    _write_json(args, rows)


def _write_json(args, rows: list[dict]) -> None:
    if not args.json:
        return
    with atomic_file(args.json) as f:
        json.dump({"command": "python -m benchmarks.attention " + " ".join(sys.argv[1:]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
