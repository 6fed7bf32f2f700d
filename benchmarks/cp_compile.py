"""Context-parallel strategies under the TPU compiler: one 8B stage, each strategy, XLA bytes beside the planner's.

    PYTHONPATH=/path/to/libtpu-site python -m benchmarks.cp_compile [--rows 1m:ring,1m:hybrid,...] [--replan]
    python -m benchmarks.cp_compile --collect 1m:ring=ring.json 262k@v5p-128:hybrid=hybrid.json ...

For each ``case:strategy`` (a case is a stage of ``configs/llama3-8b-1m.yaml``, optionally
``@slice``) the stage's train step is compiled deviceless for its slice (`SLICES`: by default the
slice and fsdp × sequence mesh the memory planner picks, as ``benchmarks.compile_table`` does) with
``--set model.context_parallel=STRATEGY`` (hybrid also ``model.ulysses_size``), exactly as
``python -m sharding compile`` does (`train.compile.compile_run`). Each row: XLA's bytes per
device (arguments + temp + outputs − aliased), the planner's (`sharding.planner.plan_memory` for that
strategy), whether it fits the chip's HBM, the attention kernel and the compile time. A strategy the
shapes rule out (e.g. hybrid on a sequence axis of 2) is a row saying why, without compiling.

``--collect KEY=FILE`` takes rows already written by ``python -m sharding compile --json FILE`` (the
same compile, run by hand) instead of compiling; ``--replan`` recomputes the planner column only.
Results go to ``benchmarks/results/cp_compile.json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

from model.params import abstract_params
from sharding.cp_plan import LINKS, model_strategies
from sharding.planner import PlanError, plan_memory
from train.compile import compile_run, deviceless_setup, only_stage
from train.config import load_config, validate

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cp_compile.json"
CONFIG = "configs/llama3-8b-1m.yaml"
# case: (slice, fsdp, sequence, hybrid's Ulysses group). "1m" and "262k": the smallest slice the planner
# fits the stage on (compile_table's choice); "262k@v5p-128": the next slice, where hybrid is possible.
SLICES = {"1m": ("v5p-128", 4, 16, 8), "262k": ("v5p-64", 16, 2, 2), "262k@v5p-128": ("v5p-128", 16, 4, 2)}
STRATEGIES = ("ring", "hybrid", "allgather", "ulysses")
ROWS = tuple(f"{s}:{c}" for s in SLICES for c in STRATEGIES)
GiB = 1024**3


def _stage(case: str) -> str:
    return case.split("@")[0]


def overrides(case: str, strategy: str) -> list[str]:
    """The ``--set`` list of one row (mesh, strategy and, for hybrid, its group)."""
    _, fsdp, sequence, group = SLICES[case]
    stage = _stage(case)
    index = [s.name for s in load_config(str(ROOT / CONFIG)).stages].index(stage)
    out = [f"stages.{index}.mesh={{data: 1, fsdp: {fsdp}, tensor: 1, sequence: {sequence}}}",
           f"model.context_parallel={strategy}"]  # fmt: skip
    return out + ([f"model.ulysses_size={group}"] if strategy == "hybrid" else [])


def command(key: str) -> str:
    case, strategy = key.split(":")
    sets = " ".join(f"--set '{o}'" for o in overrides(case, strategy))
    return f"python -m sharding compile --config {CONFIG} --stage {_stage(case)} --topology {SLICES[case][0]} {sets}"


def planned(key: str) -> int:
    """The planner's bytes per device for ``key`` (raises `PlanError` when the strategy cannot run)."""
    case, strategy = key.split(":")
    cfg = load_config(str(ROOT / CONFIG), overrides(case, strategy))
    topo, fsdp, sequence, _ = SLICES[case]
    stage = _stage(case)
    (plan,) = [p for p in validate(only_stage(cfg, stage), fsdp * sequence) if p.name == stage]
    m, s = plan.model, plan.stage
    return plan_memory(m, abstract_params(m, cfg.lora), s.seq_len, s.batch_size, dict(fsdp=fsdp, sequence=sequence),
                       m.remat_policy, loss_chunk=cfg.loss_chunk, lora=cfg.lora).total  # fmt: skip


def why_not(key: str) -> str:
    """Why the strategy cannot run on the stage's mesh ("" when it can)."""
    case, strategy = key.split(":")
    cfg = load_config(str(ROOT / CONFIG), overrides(case, strategy))
    _, fsdp, sequence, _ = SLICES[case]
    stage = _stage(case)
    (plan,) = [p for p in validate(only_stage(cfg, stage), fsdp * sequence) if p.name == stage]
    sizes = dict(data=1, fsdp=fsdp, tensor=1, sequence=sequence)
    plans = model_strategies(plan.model, plan.stage.seq_len, plan.stage.batch_size, sizes, LINKS["tpu-v5p"])
    return next(p.why_not for p in plans if p.strategy == strategy)


def finish(key: str, row: dict) -> dict:
    case, strategy = key.split(":")
    row.update(key=key, case=case, strategy=strategy, command=command(key))
    if strategy == "hybrid":
        row["ulysses_size"] = SLICES[case][3]
    if row.get("xla_bytes_per_device"):
        total = planned(key)
        row.update(planner_bytes_per_device=int(total), planner_ratio=round(total / row["xla_bytes_per_device"], 4))
    return row


def run(key: str) -> dict:
    case, strategy = key.split(":")
    reason = why_not(key)
    if reason:
        return {"key": key, "case": case, "strategy": strategy, "topology": SLICES[case][0], "not_possible": reason}
    cfg = load_config(str(ROOT / CONFIG), overrides(case, strategy))
    (row,) = compile_run(cfg, SLICES[case][0], _stage(case))
    return finish(key, row)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| stage | slice | mesh | strategy | XLA GiB/device (arg + temp + out − alias) | planner GiB | planner / XLA "
        "| within ±10% | fits 95 GiB | kernel | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        topo, fsdp, sequence, _ = SLICES[r["case"]]
        mesh = f"fsdp={fsdp} × sequence={sequence}"
        name = r["strategy"] + (f" (U={r['ulysses_size']})" if r.get("ulysses_size") else "")
        stage = _stage(r["case"])
        if "not_possible" in r:
            lines.append(f"| {stage} | {topo} | {mesh} | {name} | not possible: {r['not_possible']} | | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {stage} | {topo} | {mesh} | {name} | **does not compile**: {r['error'][:100]} "
                         f"| | | | | {r['kernel']} | {r['compile_s']:.0f} |")  # fmt: skip
            continue
        x, ratio = r["xla_bytes"], r["planner_ratio"]
        ok = "yes" if 0.9 <= ratio <= 1.1 else "**not met**"
        lines.append(
            f"| {stage} | {topo} | {mesh} | {name} | {r['xla_bytes_per_device'] / GiB:.1f} "
            f"({x['argument'] / GiB:.1f} + {x['temp'] / GiB:.1f} + {x['output'] / GiB:.1f} − {x['alias'] / GiB:.1f}) "
            f"| {r['planner_bytes_per_device'] / GiB:.1f} | {ratio:.2f} | {ok} | {'yes' if r['fits'] else '**no**'} "
            f"| {r['kernel']} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"stage:strategy keys (default {','.join(ROWS)})")
    p.add_argument("--replan", action="store_true", help="recompute the planner column of the stored rows")
    p.add_argument("--collect", nargs="+", metavar="KEY=FILE", help="rows from `python -m sharding compile --json`")
    args = p.parse_args()
    deviceless_setup()
    stored = {r["key"]: r for r in json.loads(OUT.read_text())} if OUT.exists() else {}
    if args.replan:
        stored = {k: finish(k, r) if "not_possible" not in r else r for k, r in stored.items()}
    elif args.collect:
        for item in args.collect:
            key, path = item.split("=", 1)
            (row,) = json.loads(pathlib.Path(path).read_text())
            stored[key] = finish(key, row)
    else:
        for key in args.rows.split(","):
            try:
                stored[key] = run(key)
            except PlanError as exc:
                case, strategy = key.split(":")
                stored[key] = {"key": key, "case": case, "strategy": strategy, "topology": SLICES[case][0],
                               "not_possible": str(exc)}  # fmt: skip
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(list(stored.values()), indent=1))
    for key in ROWS:  # a strategy the shapes rule out: say why, though nobody asked to compile it
        if key not in stored and why_not(key):
            stored[key] = run(key)
    rows = sorted(stored.values(), key=lambda r: ROWS.index(r["key"]) if r["key"] in ROWS else len(ROWS))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    main()
