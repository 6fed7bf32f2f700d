"""Prefill and decode throughput of the eval generation path: one device vs ring prefill on the mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m benchmarks.prefill_decode --preset tiny --lengths 1k,2k,4k,8k,16k --new-tokens 32

Prefill tokens/s = batch × prompt tokens / prefill seconds; decode tokens/s = batch × new
tokens / decode seconds. Both paths are the halves of the one decoder, `model.generate`: one
device prefills through the model's cached path (blockwise attention above 1K keys) and decodes
with dense attention over the cache; the ring path prefills with ring attention into a cache
sharded over ``sequence`` (`evals.generation.cache_sharding`) and decodes over the sharded
cache. Each timing is the best of ``--repeats`` runs after a compile-and-warm-up run; EOS is
disabled so every run decodes all N tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import model
from convert.atomic import atomic_file
from evals.cli import parse_lengths
from evals.generation import cache_sharding
from model.generate import cache_len, decode, prefill, stop_ids
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import axis_rules, shard_params


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def time_path(cfg, params, prompt, new: int, mesh, repeats: int) -> tuple[float, float]:
    """``(prefill seconds, decode seconds)``; ``mesh`` None for one device."""
    b, t = prompt.shape
    tokens = jax.numpy.asarray(prompt)
    max_len = cache_len(t, new + 1, mesh)
    shardings = None if mesh is None else cache_sharding(cfg, mesh, b, max_len)

    def run_prefill():
        with axis_rules(mesh):  # the ring prefill traces the model on the mesh
            return prefill(params, tokens, config=cfg, max_len=max_len, mesh=mesh, cache_sharding=shardings)

    t_prefill = _best(run_prefill, repeats)
    logits, cache = run_prefill()
    key, temperature, top_p, eos, pad = jax.random.key(0), 0.0, 1.0, stop_ids(cfg, ()), 0
    t_decode = _best(
        lambda: decode(
            params,
            logits,
            cache,
            key,
            temperature,
            top_p,
            eos,
            pad,
            config=cfg,
            max_new_tokens=new + 1,
            greedy=True,
            cache_sharding=shardings,
        ),  # fmt: skip
        repeats,
    )
    return t_prefill, t_decode


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--lengths", default="1k,2k,4k,8k,16k")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mesh", default="data=1,fsdp=1,sequence=8")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-single", action="store_true", help="only the ring path")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)

    lengths = parse_lengths(args.lengths)
    cfg = model.preset(args.preset, max_position_embeddings=max(lengths) + args.new_tokens + 64)
    params = model.init_params(cfg, jax.random.key(0))
    mesh = make_mesh(MeshConfig.parse(args.mesh))
    sharded = shard_params(params, mesh, model.logical_axes(cfg))
    rng = np.random.default_rng(0)
    rows = []
    print(f"preset {args.preset} ({model.count_params(params):,} params), batch {args.batch}, {args.new_tokens} new")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, ring mesh {args.mesh}")
    print("| prompt | path | prefill s | prefill tok/s | decode s | decode tok/s |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in lengths:
        prompt = rng.integers(3, cfg.vocab_size, size=(args.batch, t)).astype(np.int32)
        paths = [] if args.skip_single else ["1 device"]
        paths.append(f"ring {args.mesh}")
        for name in paths:
            if name == "1 device":
                tp, td = time_path(cfg, params, prompt, args.new_tokens, None, args.repeats)
            else:
                tp, td = time_path(cfg, sharded, prompt, args.new_tokens, mesh, args.repeats)
            row = {
                "prompt": t,
                "path": name,
                "prefill_s": tp,
                "prefill_tok_s": args.batch * t / tp,
                "decode_s": td,
                "decode_tok_s": args.batch * args.new_tokens / td,
            }
            rows.append(row)
            print(
                f"| {t:,} | {name} | {tp:.3f} | {row['prefill_tok_s']:,.0f} | {td:.3f} | {row['decode_tok_s']:,.1f} |",
                flush=True,
            )
    if args.json:
        with atomic_file(args.json) as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
