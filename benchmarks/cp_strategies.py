"""Context-parallel strategies (ring, allgather, ulysses, hybrid) against one-device blockwise at equal work.

    python -m benchmarks.cp_strategies [--lengths 16k,64k] [--json benchmarks/results/cp_strategies.json]

(The script sets ``--xla_force_host_platform_device_count=8`` itself when XLA_FLAGS is unset.)

Every case jit-compiles ``grad(sum(attention(q, k, v) · do))`` w.r.t. q, k, v: causal, zigzag
layout (positions from `attention.layout.layout_positions`), fp32, batch 1, 8 query / 2 kv heads
(GQA 4:1, the heads Ulysses can split over 8 devices: one query head each, the 2 kv heads
replicated to 8), head_dim 64. Cases on the 8-device ``sequence`` mesh: ``ring``, ``allgather``,
``ulysses`` (one group of 8), ``hybrid 2×4`` (``ulysses_size`` 4: 2 groups of 4) and
``hybrid 4×2`` (``ulysses_size`` 2); the baseline is ``blockwise`` on one device over the whole
sequence (same causal skipping, same chunk).

**Equal work.** All strategies compute the same causal attention: with causal skipping their
executed chunk pairs add up (over the 8 devices) to about the one-device blockwise count W; each
device does ≈ W/8. On the emulated mesh the 8 "devices" share the host's cores and there are no
links (a collective is a memory copy), so a strategy's wall time is the time of *all 8 devices'*
work. The comparison at equal work is therefore the strategy's time against blockwise over the
full sequence on one device::

    overhead = T_strategy / T_blockwise(S)        (≥ 1: the cost of splitting the work 8 ways)

On 8 real devices with free links the per-device time would be ≈ overhead · T_blockwise(S) / 8,
so the same ratio is the per-device-equivalent overhead against an ideal 8-way split. A ratio
below 1 is possible where a case's tiles are finer than blockwise's (a causal diagonal tile costs
as much as a full one, so finer tiles skip more of the triangle) or where eight small programs use
the cores better than one large one. It shows
compute overhead only (smaller hop kernels, merges, all-to-all / gather copies, padding, imbalance
is hidden because devices share the cores); communication cost needs real links. ``cpu s`` (process
CPU time, all threads) gives the same ratio less sensitive to how well a case keeps the cores busy.

Reported per case and length: compile seconds; ``temp MiB/dev``, the compiled per-device program's
``memory_analysis().temp_size_in_bytes`` (scratch beyond arguments and outputs; a ``shard_map``
program is per device); median wall and CPU seconds of ``--repeats`` timed runs after ``--warmup``
untimed ones, cases of one length interleaved so load from other jobs affects them alike; and
``overhead``. Blockwise is also compiled at S/8 (not timed) for the memory each device would need
with no context parallelism at its share of the tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attention.blockwise import blockwise_attention  # noqa: E402
from attention.layout import layout_positions  # noqa: E402
from attention.strategies import sharded_attention  # noqa: E402
from benchmarks.attention import _parse_lengths  # noqa: E402
from convert.atomic import atomic_file  # noqa: E402
from sharding import MeshConfig, axis_rules, make_mesh  # noqa: E402

DEVICES = 8
# case → (strategy, ulysses_size); None: one-device blockwise
CASES = {
    "blockwise": (None, None),
    "ring": ("ring", None),
    "allgather": ("allgather", None),
    "ulysses": ("ulysses", None),
    "hybrid 2×4": ("hybrid", 4),
    "hybrid 4×2": ("hybrid", 2),
}
DEFAULT_JSON = "benchmarks/results/cp_strategies.json"


def _grad_fn(case: str, args, mesh, seq: int):
    """``(q, k, v, do) -> (dq, dk, dv)`` of one case."""
    strategy, ulysses_size = CASES[case]
    if strategy is None:

        def attend(q, k, v):
            return blockwise_attention(q, k, v, causal=True, chunk_size=args.chunk)[0]
    else:
        pos = layout_positions(args.batch, seq, DEVICES, "zigzag")

        @axis_rules(mesh)
        def attend(q, k, v):
            return sharded_attention(
                q,
                k,
                v,
                mesh=mesh,
                strategy=strategy,
                ulysses_size=ulysses_size,
                q_positions=pos,
                kv_positions=pos,
                chunk_size=args.chunk,
            )

    def grads(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * do), argnums=(0, 1, 2))(q, k, v)

    return grads


def _inputs(args, seq: int, mesh):
    rng = np.random.default_rng(0)
    heads = (args.heads, args.kv_heads, args.kv_heads, args.heads)
    arrays = [rng.standard_normal((args.batch, seq, h, args.head_dim), np.float32) for h in heads]
    if mesh is None:
        return [jax.device_put(a, jax.devices()[0]) for a in arrays]
    return [jax.device_put(a, NamedSharding(mesh, P(None, "sequence"))) for a in arrays]


def measure(case: str, args, mesh, seq: int) -> tuple[dict, object, list]:
    """Compile one case: ``(row, compiled, inputs)``; the row has compile time and temp memory."""
    mesh = None if CASES[case][0] is None else mesh
    inputs = _inputs(args, seq, mesh)
    t0 = time.perf_counter()
    compiled = jax.jit(_grad_fn(case, args, mesh, seq)).lower(*inputs).compile()
    row = {
        "case": case,
        "seq": seq,
        "devices": 1 if mesh is None else DEVICES,
        "compile_s": time.perf_counter() - t0,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }
    return row, compiled, inputs


def time_cases(prepared: list, args) -> None:
    """Median wall and CPU time of ``repeats`` runs per case after ``warmup``, cases interleaved."""
    for _ in range(args.warmup):
        for _, compiled, inputs in prepared:
            jax.block_until_ready(compiled(*inputs))
    walls: dict[int, list[float]] = {i: [] for i in range(len(prepared))}
    cpus: dict[int, list[float]] = {i: [] for i in range(len(prepared))}
    for _ in range(args.repeats):
        for i, (_, compiled, inputs) in enumerate(prepared):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled(*inputs))
            walls[i].append(time.perf_counter() - t0)
            cpus[i].append(time.process_time() - c0)
    for i, (row, _, _) in enumerate(prepared):
        row["wall_s"], row["cpu_s"] = statistics.median(walls[i]), statistics.median(cpus[i])
        row["wall_all_s"], row["cpu_all_s"] = walls[i], cpus[i]


def _add_overheads(rows: list[dict]) -> None:
    """``overhead`` (wall) and ``cpu_overhead``: time over blockwise on one device at the same length."""
    base = {r["seq"]: r for r in rows if r["case"] == "blockwise" and "wall_s" in r}
    for r in rows:
        b = base.get(r["seq"])
        if b is not None and "wall_s" in r:
            r["overhead"] = r["wall_s"] / b["wall_s"]
            r["cpu_overhead"] = r["cpu_s"] / b["cpu_s"]


def _fmt_length(seq: int) -> str:
    return f"{seq // 1024}K" if seq % 1024 == 0 else str(seq)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| S | case | devices | compile s | temp MiB/dev | wall s (median) | cpu s (median) | overhead (wall) "
        "| overhead (cpu) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        timed = (
            f"{r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r.get('overhead', float('nan')):.2f}× | "
            f"{r.get('cpu_overhead', float('nan')):.2f}×"
            if "wall_s" in r
            else "not run | – | – | –"
        )
        lines.append(
            f"| {_fmt_length(r['seq'])} | {r['case']} | {r['devices']} | {r['compile_s']:.1f} | "
            f"{r['temp_bytes'] / 2**20:,.1f} | {timed} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16k,64k", help="comma list of sequence lengths, e.g. 16384,65536 or 16k")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512, help="chunk of the local kernel, every case")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation is separate)")
    parser.add_argument("--no-run", dest="run", action="store_false", help="compile only: temp memory")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"write the rows here (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"benchmarks.cp_strategies: unknown case(s) {', '.join(unknown)}: use {', '.join(CASES)}.")
    lengths = _parse_lengths(args.lengths)
    bad = [s for s in lengths if s % (2 * DEVICES)]
    if bad:
        raise SystemExit(f"benchmarks.cp_strategies: lengths {bad} must be multiples of {2 * DEVICES} (zigzag on 8).")
    if jax.device_count() < DEVICES:
        raise SystemExit(
            "benchmarks.cp_strategies needs 8 devices: set XLA_FLAGS=--xla_force_host_platform_device_count=8."
        )
    jax.config.update("jax_default_matmul_precision", "highest")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1, sequence=DEVICES), devices=jax.devices()[:DEVICES])
    setup = (
        f"batch {args.batch}, {args.heads} query / {args.kv_heads} kv heads, head_dim {args.head_dim}, fp32, causal, "
        f"zigzag on {DEVICES} emulated devices, chunk {args.chunk}, fwd+bwd; jax {jax.__version__} on "
        f"{platform.machine()} ({os.cpu_count()} cores)"
    )
    rows: list[dict] = []
    for seq in lengths:
        prepared = [measure(case, args, mesh, seq) for case in cases]
        if "blockwise" in cases:  # memory of one device holding its S/8 share with no context parallelism
            row, _, _ = measure("blockwise", args, mesh, seq // DEVICES)
            prepared_rows = [row | {"case": "blockwise at S/8", "seq": seq}]
        else:
            prepared_rows = []
        if args.run:
            time_cases(prepared, args)
        rows += [row for row, _, _ in prepared] + prepared_rows
        del prepared
        _add_overheads(rows)
        print(format_table([r for r in rows if r["seq"] == seq]), flush=True)
        _write_json(args, setup, rows)
    print()
    print(setup)
    print("overhead = strategy time / one-device blockwise time over the same S (equal total work; see the docstring)")
    print(format_table(rows))
    _write_json(args, setup, rows)


def _write_json(args, setup: str, rows: list[dict]) -> None:
    if not args.json:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with atomic_file(args.json) as f:
        command = "python -m benchmarks.cp_strategies " + " ".join(sys.argv[1:])
        json.dump({"command": command, "setup": setup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
