"""Deviceless TPU compile of context-parallel attention, forward + backward, per strategy and kernel.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"   # libtpu (make test does)
    python -m benchmarks.tpu_attention_compile [--tokens 16384] [--chip v5p] [--json PATH]

The real XLA TPU compiler (Mosaic included) on a CPU-only host: each strategy (ring, allgather,
ulysses, hybrid) with each kernel (the jnp loops and the Mosaic TPU Pallas kernels) on a 4-chip
slice with ``sequence=4``: compile time and XLA's per-device temp and argument bytes.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.topologies import get_topology_desc  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attention import STRATEGIES, attention, compile_target  # noqa: E402

CHIPS = {
    "v5p": dict(topology_name="v5p:2x2x1", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1)),
    "v6e": dict(topology_name="v6e:2x2", chip_config_name="default", chips_per_host_bounds=(2, 2, 1)),
}


def compile_one(mesh, strategy: str, kernel: str, b: int, t: int, n: int, k: int, h: int) -> dict:
    def loss(q, kk, v, pos):
        out = attention(q, kk, v, impl=strategy, mesh=mesh, q_positions=pos, kv_positions=pos, kernel=kernel,
                        ulysses_size=2 if strategy == "hybrid" else None)  # fmt: skip
        return out.astype(jnp.float32).sum()

    sh = NamedSharding(mesh, P(None, "sequence"))
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sh, sh, sh, sh))
    S = jax.ShapeDtypeStruct
    args = (S((b, t, n, h), jnp.bfloat16), S((b, t, k, h), jnp.bfloat16), S((b, t, k, h), jnp.bfloat16),
            S((b, t), jnp.int32))  # fmt: skip
    t0 = time.time()
    with compile_target("tpu"):
        compiled = f.lower(*args).compile()
    mem = compiled.memory_analysis()
    mosaic = compiled.as_text().count("tpu_custom_call")
    return dict(strategy=strategy, kernel=kernel, compile_s=round(time.time() - t0, 1), mosaic_calls=mosaic,
                temp_mib=round(mem.temp_size_in_bytes / 2**20, 1),
                argument_mib=round(mem.argument_size_in_bytes / 2**20, 1))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--chip", choices=tuple(CHIPS), default="v5p")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    topo = get_topology_desc(platform="tpu", num_slices=1, **CHIPS[args.chip])
    devices = np.array(topo.devices).reshape(1, 1, 1, 4)
    mesh = Mesh(devices, ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4)
    b, n, k, h = 1, 8, 2, 128
    rows = []
    print(f"{args.chip}, 4 chips, sequence=4, {args.tokens} tokens, {n}/{k} heads, h {h}, bf16, causal, fwd+bwd")
    print("| strategy | kernel | compile s | Mosaic calls | temp MiB/device | arguments MiB/device |")
    print("|---|---|---:|---:|---:|---:|")
    for strategy in STRATEGIES:
        for kernel in ("jnp", "mosaic_tpu"):
            row = compile_one(mesh, strategy, kernel, b, args.tokens, n, k, h)
            rows.append(row)
            print(f"| {strategy} | {kernel} | {row['compile_s']} | {row['mosaic_calls']} | {row['temp_mib']} | "
                  f"{row['argument_mib']} |", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
