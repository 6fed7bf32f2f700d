"""Deviceless v5p compile of the Mosaic attention kernels against JAX's shipped splash attention.

    pip install --target /tmp/tpusite libtpu==0.0.42.1      # the compiler jax 0.10.2 needs
    PYTHONPATH=/tmp/tpusite python -m benchmarks.tpu_kernel_compile

One v5p chip, plain causal attention, b=1, t=s=4096, 8 query heads on 2 kv heads, h=128, bf16,
inputs and gradients in the model's ``[b, t, n, h]`` layout (both sides pay their transposes to
heads-major). For each: compile time and ``memory_analysis()`` of the forward alone and of
forward + backward (dq, dk, dv from an output cotangent). Splash takes GQA natively (k/v with
fewer heads), so K/V are not repeated for it either. Nothing runs: this compares what the
compiler accepts and the HBM it plans, not speed.

Measured with jax 0.10.2 + libtpu 0.0.42.1 (compile seconds on a loaded 2-core host; temp per chip):

    mosaic_tpu 512 tiles   fwd  3.8 s  16.5 MiB   fwd+bwd 10.5 s  16.5 MiB  (fp32 out / grads)
    splash     512 tiles   fwd  3.4 s   8.7 MiB   fwd+bwd 10.2 s  19.3 MiB  (bf16 out / grads)
    splash     128 tiles   fwd  2.9 s   8.3 MiB   fwd+bwd  9.7 s  18.7 MiB

Our forward's extra temp is its fp32 heads-major output before the transpose back to
``[b, t, n, h]`` (16 MiB here); splash returns q's dtype.
"""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas.ops.tpu import splash_attention as splash  # noqa: E402
from jax.experimental.topologies import get_topology_desc  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from attention.kernels import compile_target  # noqa: E402
from attention.pallas_tpu import mosaic_tpu_backward, mosaic_tpu_forward  # noqa: E402

B, T, N, K, H = 1, 4096, 8, 2, 128
SCALE = H**-0.5


def ours(tile: int):
    kw = dict(causal=True, scale=SCALE, block_q=tile, block_k=tile)

    def fwd(q, k, v, pos, do):
        seg = jnp.zeros_like(pos)
        return mosaic_tpu_forward(q, k, v, pos, pos, seg, seg, **kw)[0]

    def fwd_bwd(q, k, v, pos, do):
        seg = jnp.zeros_like(pos)
        out, lse = mosaic_tpu_forward(q, k, v, pos, pos, seg, seg, **kw)
        delta = jnp.sum(do.astype(jnp.float32) * out, axis=-1)
        return mosaic_tpu_backward(q, k, v, pos, pos, seg, seg, do, lse, delta, **kw)

    return fwd, fwd_bwd


def splash_mha(tile: int):
    mask = splash.MultiHeadMask([splash.CausalMask((T, T))] * N)
    sizes = splash.BlockSizes(
        block_q=tile, block_kv=tile, block_q_dkv=tile, block_kv_dkv=tile, block_q_dq=tile, block_kv_dq=tile
    )
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, t, n, h] -> [b, n, t, h]

    def attend(q, k, v):  # positions are array indices for splash: pos is unused
        return heads_major(jax.vmap(kernel)(heads_major(q * SCALE), heads_major(k), heads_major(v)))

    def fwd(q, k, v, pos, do):
        return attend(q, k, v)

    def fwd_bwd(q, k, v, pos, do):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(do)

    return fwd, fwd_bwd


def report(name, fn, args) -> None:
    t0 = time.time()
    with compile_target("tpu"):
        compiled = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    kernels = compiled.as_text().count("tpu_custom_call")
    print(
        f"{name:<34} compile {seconds:5.1f} s   temp {mem.temp_size_in_bytes / 2**20:7.1f} MiB   "
        f"args {mem.argument_size_in_bytes / 2**20:5.1f} MiB   out {mem.output_size_in_bytes / 2**20:5.1f} MiB   "
        f"{kernels} Mosaic calls",
        flush=True,
    )


def main() -> None:
    topo = get_topology_desc(
        platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1), num_slices=1,
    )  # fmt: skip
    sh = SingleDeviceSharding(topo.devices[0])
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)  # noqa: E731
    args = (spec((B, T, N, H)), spec((B, T, K, H)), spec((B, T, K, H)), spec((B, T), jnp.int32), spec((B, T, N, H)))
    print(f"v5p, one chip: causal, b={B} t=s={T} n={N} k={K} h={H} bf16 ({jax.__version__})")
    for label, make, tile in (
        ("mosaic_tpu (ours)", ours, 512),
        ("mosaic_tpu (ours)", ours, 128),
        ("splash make_splash_mha", splash_mha, 512),
        ("splash make_splash_mha", splash_mha, 128),
    ):
        fwd, fwd_bwd = make(tile)
        report(f"{label} {tile} fwd", fwd, args)
        report(f"{label} {tile} fwd+bwd", fwd_bwd, args)


if __name__ == "__main__":
    main()
