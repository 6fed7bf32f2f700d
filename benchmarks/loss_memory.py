"""Peak temporary memory of the chunked cross-entropy vs full logits, from XLA's compiled memory analysis.

Nothing is executed: each variant (forward + gradient w.r.t. hidden states and head) is compiled
for one device and ``compiled.memory_analysis().temp_size_in_bytes`` — the scratch XLA allocates
beyond inputs and outputs — is reported. That is where ``[t, v]`` logits (and their gradient) would
live.

    python -m benchmarks.loss_memory --seq 32768 --hidden 2048 --vocab 128256 --chunks 512,2048,8192
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from model.loss import chunked_cross_entropy, full_cross_entropy


def temp_bytes(fn, *args) -> tuple[int, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes), time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16", help="hidden-state (compute) dtype")
    ap.add_argument("--head-dtype", default="float32", help="output-head (master weight) dtype")
    ap.add_argument("--chunks", default="512,2048,8192", help="comma-separated loss chunks")
    ap.add_argument("--skip-full", action="store_true", help="do not compile the full-logits variant")
    args = ap.parse_args(argv)

    b, t, d, v = args.batch, args.seq, args.hidden, args.vocab
    h = jax.ShapeDtypeStruct((b, t, d), jnp.dtype(args.dtype))
    w = jax.ShapeDtypeStruct((d, v), jnp.dtype(args.head_dtype))
    tgt = jax.ShapeDtypeStruct((b, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)
    gib = 2.0**30
    logits_gib = b * t * v * 4 / gib
    print(f"batch {b}, seq {t}, hidden {d}, vocab {v}, {args.dtype} hidden, {args.head_dtype} head")
    print(f"fp32 logits alone = {logits_gib:.2f} GiB")
    print("| variant | temp memory (GiB) | compile (s) |")
    print("|---|---:|---:|")
    variants = [] if args.skip_full else [("full logits", None)]
    variants += [(f"chunked, chunk {c}", int(c)) for c in args.chunks.split(",")]
    for name, chunk in variants:

        def loss(hid, head, targets, m, chunk=chunk):
            if chunk is None:
                s, n = full_cross_entropy(hid, head, targets, m)
            else:
                s, n = chunked_cross_entropy(hid, head, targets, m, chunk)
            return s / n

        grad = jax.grad(loss, argnums=(0, 1))
        size, secs = temp_bytes(grad, h, w, tgt, mask)
        print(f"| {name} | {size / gib:.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
