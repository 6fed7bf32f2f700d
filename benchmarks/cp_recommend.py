"""The planner's context-parallel recommendation for Llama-3-8B at 128K, 256K and 1M tokens.

    python -m benchmarks.cp_recommend [--json benchmarks/results/cp_recommend.json]

For each length, on a v5p slice (ICI between all chips) and on 8-GPU H100 nodes (NVLink inside a
node, InfiniBand across), the per-strategy costs per device and layer from `sharding.cp_plan` and
the pick (`recommend`, with the device's HBM less the memory plan's other terms as headroom).
Meshes: ``sequence`` 8 (one GPU node) at 128K, 16 at 256K, 64 at 1M, with the smallest power-of-two
``fsdp`` for which the memory plan (with the ring) fits the HBM.
A model of rates (the kernel and link tables of `sharding.comm`), not a measurement.
"""

from __future__ import annotations

import argparse
import json

import model
from sharding.cp_plan import LINKS, model_strategies, recommend
from sharding.planner import plan_memory

GiB = 2**30
# (target, links key, HBM per device)
TARGETS = (("v5p", "tpu-v5p", 95 * GiB), ("8×H100 nodes", "h100", 80 * GiB))
LENGTHS = ((131072, 8), (262144, 16), (1048576, 64))  # tokens, sequence axis


def rows() -> list[dict]:
    cfg = model.preset("llama3-8b", dtype="bfloat16", remat_policy="full")
    params = model.abstract_params(cfg)
    out = []
    for target, key, hbm in TARGETS:
        for seq_len, seq in LENGTHS:
            for fsdp in (1, 2, 4, 8, 16, 32):
                mesh = dict(fsdp=fsdp, sequence=seq)
                sizes = {"data": 1, "tensor": 1, **mesh}
                plan = plan_memory(cfg, params, seq_len, 1, sizes, "full")
                if plan.total <= hbm:
                    break
            plans = model_strategies(cfg, seq_len, 1, sizes, LINKS[key])
            ring = next(p for p in plans if p.strategy == "ring")
            choice, why = recommend(plans, hbm - plan.total + ring.extra_bytes)
            ok = [p for p in plans if p.feasible]
            out.append(dict(target=target, seq_len=seq_len, mesh=mesh, planner_gib=round(plan.total / GiB, 1),
                            choice=choice, why=why, layer_ms={p.strategy: round(p.layer_s * 1e3, 1) for p in ok},
                            extra_gib={p.strategy: round(p.extra_bytes / GiB, 2) for p in ok}))  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    table = rows()
    print("| target | tokens | mesh | plan GiB/device (ring) | ms per layer: ring / allgather / ulysses / hybrid "
          "| extra GiB: allgather | pick | why |")  # fmt: skip
    print("|---|---:|---|---:|---|---:|---|---|")
    for r in table:
        ms = " / ".join(str(r["layer_ms"].get(s, "–")) for s in ("ring", "allgather", "ulysses", "hybrid"))
        mesh = " × ".join(f"{k}={v}" for k, v in r["mesh"].items())
        print(f"| {r['target']} | {r['seq_len'] // 1024}K | {mesh} | {r['planner_gib']} | {ms} | "
              f"{r['extra_gib'].get('allgather', '–')} | **{r['choice']}** | {r['why']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
