"""Deviceless TPU compile check of the jnp ring attention, forward and backward (v5p, 4 chips).

    pip install --target /tmp/tpusite libtpu==0.0.42.1      # the compiler jax 0.10.2 needs
    PYTHONPATH=/tmp/tpusite python -m benchmarks.tpu_ring_compile

The real XLA TPU compiler on a CPU-only host: a check that the attention kernels' signatures
still compile for TPU. The Pallas kernels do not yet meet Mosaic's tiling (issue 17), so this
compiles ``kernel="jnp"``.
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.topologies import get_topology_desc  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from attention import attention  # noqa: E402
from sharding import axis_rules  # noqa: E402


def main() -> None:
    topo = get_topology_desc(
        platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    )  # fmt: skip
    devices = np.array(topo.devices).reshape(1, 1, 1, 4)
    mesh = Mesh(devices, ("data", "fsdp", "tensor", "sequence"), axis_types=(AxisType.Auto,) * 4)
    b, t, n, k, h = 1, 4096, 8, 2, 128

    def loss(q, kk, v, pos):
        with axis_rules(mesh):
            out = attention(q, kk, v, impl="ring", mesh=mesh, q_positions=pos, kv_positions=pos, kernel="jnp")
        return out.astype(jnp.float32).sum()

    sh = NamedSharding(mesh, P(None, "sequence"))
    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), in_shardings=(sh, sh, sh, sh))
    S = jax.ShapeDtypeStruct
    args = (S((b, t, n, h), jnp.bfloat16), S((b, t, k, h), jnp.bfloat16), S((b, t, k, h), jnp.bfloat16),
            S((b, t), jnp.int32))  # fmt: skip
    t0 = time.time()
    mem = f.lower(*args).compile().memory_analysis()
    print(
        f"v5p ring fwd+bwd (jnp, 4 devices, {t} tokens, {n}/{k} heads, h {h}, bf16): compiled in "
        f"{time.time() - t0:.1f} s; temp {mem.temp_size_in_bytes / 2**20:.1f} MiB, "
        f"arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB per device"
    )


if __name__ == "__main__":
    main()
