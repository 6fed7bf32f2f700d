"""The compile table: for each stage of the shipped long-context configs, the smallest v5p slice it fits on.

    PYTHONPATH=/path/to/libtpu-site python -m benchmarks.compile_table [--rows 8b:1m,1b:32k] [--replan]

For each (config, stage) the slices v5p-8, -16, … -1024 are tried in increasing size; on each the
stage's mesh is the fsdp × sequence split (powers of two, batch and zigzag layout permitting) with the
smallest planner estimate, and the stage is compiled (`train.compile.compile_stage`, the command
``python -m sharding compile`` runs) with ``--set stages.N.mesh=...``. Slices on which the planner's
estimate exceeds the HBM by more than its ±10% band are skipped without compiling (saying so); the
first slice the compiler says fits ends the search. Results go to
``benchmarks/results/compile_table.json`` and a Markdown table is printed; ``--replan`` recomputes
only the planner column from the stored XLA numbers (after a planner change, no recompiles).

Each row compiles what a user gets: the attention kernel ``auto`` (on TPU the Mosaic Pallas kernels,
``mosaic_tpu``) and ``context_parallel: auto`` (the strategy `sharding.cp_plan` recommends for v5p's
links; the planner column plans that strategy). When the auto kernel does not compile the error is
kept as a row and the slice is compiled again with ``model.attention_kernel=jnp`` (``fallback`` says so).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from model.params import abstract_params
from sharding.cp_plan import LINKS, model_strategies, recommend
from sharding.planner import plan_memory
from sharding.topology import TOPOLOGIES
from train.compile import compile_run, deviceless_setup, only_stage
from train.config import load_config, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "compile_table.json"
CONFIGS = {"8b": "configs/llama3-8b-1m.yaml", "1b": "configs/llama3.2-1b-128k.yaml"}
ROWS = ("8b:65k", "8b:262k", "8b:524k", "8b:1m", "1b:32k", "1b:128k")
SLICES = ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128", "v5p-256", "v5p-512", "v5p-1024")
BAND = 1.10
GiB = 1024**3


def _overrides(index: int, fsdp: int, sequence: int, kernel: str | None = None) -> list[str]:
    mesh = [f"stages.{index}.mesh={{data: 1, fsdp: {fsdp}, tensor: 1, sequence: {sequence}}}"]
    return mesh + ([f"model.attention_kernel={kernel}"] if kernel else [])


def _plan(cfg, name: str, devices: int, fsdp: int, sequence: int, strategy: str | None = None):
    (plan,) = [p for p in validate(only_stage(cfg, name), devices) if p.name == name]
    m, s = plan.model, plan.stage
    if sequence > 1 and m.context_parallel == "auto":
        # What the compile resolves auto to on a TPU slice (`sharding.cp_plan.resolve_context_parallel`).
        sizes = dict(data=1, fsdp=fsdp, tensor=1, sequence=sequence)
        strategy = strategy or recommend(model_strategies(m, s.seq_len, s.batch_size, sizes, LINKS["tpu-v5p"]))[0]
        m = m.replace(context_parallel=strategy)
    return plan_memory(m, abstract_params(m, cfg.lora), s.seq_len, s.batch_size, dict(fsdp=fsdp, sequence=sequence),
                       m.remat_policy, loss_chunk=cfg.loss_chunk, lora=cfg.lora)  # fmt: skip


def best_mesh(path: str, name: str, index: int, devices: int):
    """``(fsdp, sequence, planner bytes)``: the split of ``devices`` the planner likes best (None: none valid)."""
    best = None
    sequence = 1
    while sequence <= devices:
        fsdp = devices // sequence
        try:
            cfg = load_config(path, _overrides(index, fsdp, sequence))
            total = _plan(cfg, name, devices, fsdp, sequence).total
        except ValueError:  # a split the batch or the layout cannot take
            total = None
        if total is not None and (best is None or total < best[2]):
            best = (fsdp, sequence, total)
        sequence *= 2
    return best


def run_row(key: str, say=print) -> list[dict]:
    model, name = key.split(":")
    path = str(ROOT / CONFIGS[model])
    index = [s.name for s in load_config(path).stages].index(name)
    tried = []
    for slice_name in SLICES:
        topo = TOPOLOGIES[slice_name]
        devices = topo.chips
        best = best_mesh(path, name, index, devices)
        if best is None:
            tried.append({"row": key, "topology": slice_name, "skipped": "no valid fsdp × sequence split"})
            continue
        fsdp, sequence, planned = best
        if planned > BAND * topo.hbm_bytes:
            tried.append({"row": key, "topology": slice_name, "skipped": f"planner {planned / GiB:.1f} GiB",
                          "mesh": {"fsdp": fsdp, "sequence": sequence}})  # fmt: skip
            continue
        cfg = load_config(path, _overrides(index, fsdp, sequence))
        (row,) = compile_run(cfg, slice_name, name, say=say)
        row["row"] = key
        tried.append(row)
        if "error" in row and row["kernel"] != "jnp":  # the auto kernel does not compile: record it, use jnp
            cfg = load_config(path, _overrides(index, fsdp, sequence, "jnp"))
            (row,) = compile_run(cfg, slice_name, name, say=say)
            row.update(row=key, fallback=f"kernel {tried[-1]['kernel']} does not compile: jnp")
            tried.append(row)
        if row.get("fits"):
            break
    return tried


def replan(rows: list[dict]) -> None:
    for row in rows:
        if row.get("xla_bytes_per_device") is None:
            continue
        model, name = row["row"].split(":")
        path = str(ROOT / CONFIGS[model])
        index = [s.name for s in load_config(path).stages].index(name)
        mesh = row["mesh"]
        cfg = load_config(path, _overrides(index, mesh["fsdp"], mesh["sequence"]))
        strategy = row["attention_impl"] if mesh["sequence"] > 1 else None
        total = _plan(cfg, name, row["devices"], mesh["fsdp"], mesh["sequence"], strategy).total
        row["planner_bytes_per_device"] = int(total)
        row["planner_ratio"] = round(total / row["xla_bytes_per_device"], 4)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| config : stage | smallest v5p slice that fits | mesh | XLA GiB/device (arg + temp + out − alias) "
        "| planner GiB | planner / XLA | within ±10% | attention | kernel | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in dict.fromkeys(r["row"] for r in rows):
        mine = [r for r in rows if r["row"] == key]
        compiled = [r for r in mine if "xla_bytes_per_device" in r or "error" in r]
        skipped = [r["topology"] for r in mine if "skipped" in r]
        for r in compiled:
            fits = r.get("fits")
            where = r["topology"] if fits else f"{r['topology']} (does not fit)"
            mesh = f"fsdp={r['mesh']['fsdp']} × sequence={r['mesh']['sequence']}"
            if "error" in r:
                lines.append(f"| {key} | {r['topology']}: **does not compile**: {r['error'][:100]} | {mesh} "
                             f"| | | | | {r['attention_impl']} | {r['kernel']} | {r['compile_s']:.0f} |")  # fmt: skip
                continue
            x = r["xla_bytes"]
            ratio = r["planner_ratio"]
            ok = "yes" if 0.9 <= ratio <= 1.1 else "**not met**"
            kernel = r["kernel"] + (" (fallback)" if r.get("fallback") else "")
            lines.append(
                f"| {key} | {where} | {mesh} | {r['xla_bytes_per_device'] / GiB:.1f} ({x['argument'] / GiB:.1f} + "
                f"{x['temp'] / GiB:.1f} + {x['output'] / GiB:.1f} − {x['alias'] / GiB:.1f}) "
                f"| {r['planner_bytes_per_device'] / GiB:.1f} | {ratio:.2f} | {ok} | {r['attention_impl']} | {kernel} "
                f"| {r['compile_s']:.0f} |"
            )
        if skipped:
            lines.append(f"| {key} | skipped (planner over HBM by > 10%): {', '.join(skipped)} | | | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"config:stage keys (default {','.join(ROWS)})")
    p.add_argument("--replan", action="store_true", help="recompute the planner column of the stored table")
    args = p.parse_args()
    deviceless_setup()
    stored = json.loads(OUT.read_text()) if OUT.exists() else []
    if args.replan:
        replan(stored)
    else:
        keys = args.rows.split(",")
        stored = [r for r in stored if r["row"] not in keys]
        for key in keys:
            stored += run_row(key)
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(stored, indent=1))  # after every row: a long run keeps what it did
    OUT.write_text(json.dumps(stored, indent=1))
    print(markdown(stored))


if __name__ == "__main__":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    main()
