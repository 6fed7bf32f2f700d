"""What a run reports: end-of-stage evals, the final model and its export, ``report.json``, a summary.

`Reporter.end_of_stage` runs held-out perplexity (the stage's length, and the next stage's length on
the next stage's data but still with this stage's θ) and, when ``eval.passkey_lengths`` is set, the
passkey grid — printing the accuracy table of every stage so far and writing
``<run_dir>/passkey/<stage>/`` (results.json, CSVs, heatmap PNG). `Reporter.finish` saves the final
model as a ringllama checkpoint (``<run_dir>/final``: its config carries the last stage's θ and max
positions), exports it to Hugging Face format when asked, checks that transformers loads it with
matching logits (and, with ``export.greedy_passkey``, that its greedy decoding retrieves passkeys),
and writes ``report.json`` (also after every stage, so a resumed run keeps earlier results) with the
``extension`` comparison (`extension`) and ``extension.png`` once the run is done.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax

from convert.atomic import atomic_file
from model import schema
from text.tokenizer import load_tokenizer
from train.config import StagePlan, TrainConfig, start_plan
from train.export import check_transformers, export_final, hf_greedy_passkey
from train.extension import (
    RETRIEVAL_TARGET,
    curve_lengths,
    extension,
    extension_table,
    plot_extension_figure,
)
from train.metrics import read_metrics
from train.stage import StageRun
from train.stage_eval import PASSKEY_RESERVE, heldout_perplexity, passkey_grid, passkey_table, write_passkey_results


@dataclass
class RunResult:
    """The outcome of `train.curriculum.run`."""

    run_dir: str
    global_step: int
    stopped: bool
    report: dict = field(default_factory=dict)
    final_config: Any = None


class Reporter:
    """Collects per-stage results into ``report.json`` (process 0 writes; every process computes)."""

    def __init__(self, cfg: TrainConfig, plans: list[StagePlan], run_dir: str, say, lead: bool, resume: bool):
        self.cfg, self.plans, self.run_dir, self.say, self.lead = cfg, plans, run_dir, say, lead
        self.path = os.path.join(run_dir, "report.json")
        self.started = time.time()
        self.data: dict[str, Any] = {"stages": {}}
        if resume and os.path.isfile(self.path):
            with open(self.path) as fh:
                self.data = json.load(fh)
        self.data.setdefault("stages", {})
        self.data.setdefault("curves", {})  # stage name -> learning-curve points (kept across --resume)
        self.data["config"] = schema.to_dict(cfg)

    def has_stage(self, name: str) -> bool:
        return name in self.data["stages"]

    def _write(self) -> None:
        if not self.lead:
            return
        with atomic_file(self.path) as fh:
            json.dump(self.data, fh, indent=1)

    def end_of_stage(self, state, run: StageRun, nxt: StagePlan | None, global_step: int) -> list[dict]:
        """Evaluate the stage's final params with its own eval steps; returns metrics records (kind ``eval``)."""
        plan, mesh = run.plan, run.mesh
        cfg, stage, t0 = self.cfg, plan.stage, time.time()
        start = start_plan(self.plans, plan)
        out = {"seq_len": stage.seq_len, "theta": plan.model.rope.theta, "steps": stage.steps,
               "max_position_embeddings": plan.model.max_position_embeddings, "global_step": global_step,
               "from": start.name if start else None, "perplexity": {},
               **_step_cost(self.run_dir, plan.name)}  # fmt: skip
        records = []
        lengths = [(stage.seq_len, stage.batch_size, plan.data)]
        seq = dict(mesh.shape)["sequence"]
        if nxt is not None and nxt.stage.seq_len != stage.seq_len and _fits(nxt.stage.seq_len, seq, plan.layout):
            # The next stage's documents: a mix of short documents packed into long rows never
            # puts a position past this stage's length, and would hide the failure to extrapolate.
            lengths.append((nxt.stage.seq_len, nxt.stage.batch_size, nxt.data))
        if cfg.eval.heldout_batches > 0:
            for length, batch, data in lengths:
                ppl = heldout_perplexity(
                    state.params, run.engine.eval_step, mesh, data, seq_len=length,
                    batch_size=cfg.eval.heldout_batch_size or batch, n_batches=cfg.eval.heldout_batches,
                    seed=cfg.seed, layout=plan.layout,
                )  # fmt: skip
                out["perplexity"][str(length)] = ppl["perplexity"]
                records.append({"kind": "eval", "stage": plan.name, "step": global_step, **ppl})
                self.say(f"{plan.name}: held-out perplexity at {length} tokens = {ppl['perplexity']:.3f}")
        if cfg.eval.passkey_lengths:
            out["passkey"] = self._passkey(state, plan, mesh)
        if cfg.eval.curve_every and stage.steps:
            out["curve"] = self.data["curves"].get(plan.name, []) + [self._closing_point(state, run, out)]
        out["eval_seconds"] = time.time() - t0
        self.data["stages"][plan.name] = out
        self._write()
        return records

    def wants_curve_point(self, plan: StagePlan, stage_step: int) -> bool:
        every = self.cfg.eval.curve_every
        return every > 0 and stage_step % every == 0 and stage_step < plan.stage.steps

    def curve_point(self, state, run: StageRun, stage_step: int) -> dict:
        """Passkey accuracy at the curve lengths after ``stage_step`` steps of the stage (a learning-curve point).

        The prompts are those of the end-of-stage grid (same seed), so points of one stage and of
        sibling branches are scored on the same passkeys; the stage-end score closes each curve.
        """
        plan, ev = run.plan, self.cfg.eval
        lengths = curve_lengths(ev, plan)
        _, agg = passkey_grid(
            state.params, plan.model, run.mesh, load_tokenizer(plan.data.tokenizer), lengths=lengths,
            samples=ev.curve_samples, depths=ev.passkey_depths, filler=ev.passkey_filler,
            template=ev.passkey_template, batch_size=ev.passkey_batch, seed=self.cfg.seed + 7,
        )  # fmt: skip
        point = {"step": stage_step, "accuracy": {str(r["length"]): r["score"] for r in agg["by_length"]}}
        curve = [p for p in self.data["curves"].get(plan.name, []) if p["step"] < stage_step]
        self.data["curves"][plan.name] = [*curve, point]
        self._write()
        shown = ", ".join(f"{n}: {v:.0%}" for n, v in point["accuracy"].items())
        self.say(f"{plan.name}: step {stage_step}: passkey {shown}")
        return point

    def _closing_point(self, state, run: StageRun, out: dict) -> dict:
        """The curve's last point: the stage-end grid's scores where it has the curve lengths, else scored now."""
        lengths = curve_lengths(self.cfg.eval, run.plan)
        scored = out.get("passkey", {}).get("accuracy", {})
        if all(str(n) in scored for n in lengths):
            return {"step": run.plan.stage.steps, "accuracy": {str(n): scored[str(n)] for n in lengths}}
        return self.curve_point(state, run, run.plan.stage.steps)

    def _passkey(self, state, plan: StagePlan, mesh) -> dict:
        ev = self.cfg.eval
        records, agg = passkey_grid(
            state.params, plan.model, mesh, load_tokenizer(plan.data.tokenizer), lengths=ev.passkey_lengths,
            samples=ev.passkey_samples, depths=ev.passkey_depths, filler=ev.passkey_filler,
            template=ev.passkey_template, batch_size=ev.passkey_batch, seed=self.cfg.seed + 7,
        )  # fmt: skip
        accuracy = {str(r["length"]): r["score"] for r in agg["by_length"]}
        if self.lead:
            settings = {"stage": plan.name, "theta": plan.model.rope.theta, "mode": "forced", "task": "passkey"}
            write_passkey_results(os.path.join(self.run_dir, "passkey", plan.name), settings, records, agg)
        by_stage = {n: s["passkey"]["aggregates"] for n, s in self.data["stages"].items() if "passkey" in s}
        by_stage[plan.name] = agg
        self.say("\n" + passkey_table(by_stage, ev.passkey_lengths) + "\n")
        return {"accuracy": accuracy, "aggregates": agg, "heatmap": f"passkey/{plan.name}/heatmap_passkey.png"}

    def finish(self, state, plan: StagePlan, mesh, global_step: int, stopped: bool) -> RunResult:
        """Save / export the final model (unless stopped early), write the report, print the summary."""
        self.data.update(global_step=global_step, stopped=stopped, final_model=plan.model.to_dict())
        self.data["wall_seconds"] = self.data.get("wall_seconds", 0.0) + (time.time() - self.started)
        if not stopped:
            self._final_model(state, plan)
        ext = extension(self.data["stages"], self.plans)
        if ext is not None:
            self.data["extension"] = ext
            if self.lead:
                ext["figure"] = plot_extension_figure(self.run_dir, self.data["stages"], self.plans)
        self._write()
        if not stopped:
            self.say(self.summary())
        return RunResult(self.run_dir, global_step, stopped, self.data, plan.model)

    def _final_model(self, state, plan: StagePlan) -> None:
        if jax.process_count() > 1:
            self.say("multi-process run: the final weights are the last checkpoint in checkpoints/ (no export)")
            return
        params = jax.device_get(state.params)
        paths = export_final(self.run_dir, plan.model, params, hf=self.cfg.export.hf)
        self.data["final_checkpoint"] = paths["final"]
        self.say(f"final model (θ {plan.model.rope.theta:.4g}, max positions {plan.model.max_position_embeddings}) "
                 f"saved to {paths['final']}")  # fmt: skip
        if "hf" in paths:
            self.data["hf_export"] = {"path": paths["hf"]}
            self.say(f"exported to Hugging Face format: {paths['hf']}")
            if self.cfg.export.check_transformers:
                check = check_transformers(paths["hf"], plan.model, params)
                self.data["hf_export"].update(check)
                self.say(
                    f"transformers loads the export: {check['loaded']}; logits max |Δ| vs ringllama "
                    f"{check['max_abs_diff']:.2e} on a {check['prompt_tokens']}-token prompt ({check['verdict']})"
                )
            if self.cfg.export.greedy_passkey > 0:
                self.data["hf_export"]["greedy_passkey"] = self._greedy(paths["hf"], plan)

    def _greedy(self, hf_dir: str, plan: StagePlan) -> dict:
        ev = self.cfg.eval
        result = hf_greedy_passkey(
            hf_dir, load_tokenizer(plan.data.tokenizer), length=plan.stage.seq_len,
            prompts=self.cfg.export.greedy_passkey, seed=self.cfg.seed + 11, filler=ev.passkey_filler,
            template=ev.passkey_template, reserve=PASSKEY_RESERVE,
        )  # fmt: skip
        self.say(greedy_line(result))
        return result

    def summary(self) -> str:
        stages = self.data["stages"]
        lines = ["", "=" * 72, f"run summary ({self.run_dir})", "=" * 72]
        for name, s in stages.items():
            ppl = ", ".join(f"{k}: {v:.3f}" for k, v in s.get("perplexity", {}).items())
            lines.append(f"{name}: seq_len {s['seq_len']}, θ {s['theta']:.4g}, {s['steps']} steps; "
                         f"held-out perplexity {ppl or 'n/a'}")  # fmt: skip
        lengths = self.cfg.eval.passkey_lengths
        if lengths:
            by_stage = {n: s["passkey"]["aggregates"] for n, s in stages.items() if "passkey" in s}
            lines += ["", passkey_table(by_stage, lengths)]
            if "extension" not in self.data:  # a linear run without a stage to compare against
                lines += _extension_verdict(stages)
        if "extension" in self.data:
            lines += ["", extension_table(self.data["extension"])]
        if "hf_export" in self.data:
            hf = {k: v for k, v in self.data["hf_export"].items() if k != "greedy_passkey"}
            lines.append(f"\nHugging Face export: {hf}")
            if "greedy_passkey" in self.data["hf_export"]:
                lines.append(greedy_line(self.data["hf_export"]["greedy_passkey"]))
        lines.append(f"wall time {self.data['wall_seconds']:.0f} s; report: {self.path}")
        return "\n".join(lines)


def _extension_verdict(stages: dict) -> list[str]:
    """Did the last stage learn to retrieve at its own length where the first stage could not?"""
    named = [(n, s) for n, s in stages.items() if "passkey" in s]
    if len(named) < 2:
        return []
    (first, s0), (last, s1) = named[0], named[-1]
    key = str(s1["seq_len"])
    if key not in s0["passkey"]["accuracy"] or key not in s1["passkey"]["accuracy"]:
        return []
    a0, a1 = s0["passkey"]["accuracy"][key], s1["passkey"]["accuracy"][key]
    met = a1 >= RETRIEVAL_TARGET and a0 < RETRIEVAL_TARGET
    return [
        f"\npasskey at {key} tokens: {first} {a0:.0%} → {last} {a1:.0%} "
        f"(target: ≥ {RETRIEVAL_TARGET:.0%} after extension where the first stage is below it: "
        f"{'met' if met else 'NOT met'})"
    ]


def greedy_line(result: dict) -> str:
    """One line: how many fresh prompts transformers' greedy decoding of the export got right."""
    shown = "; ".join(f"{e['key']} → {e['generated'].strip()!r}" for e in result["examples"][:3])
    return (f"transformers greedy generation on the HF export, {result['prompts']} fresh passkey prompts at "
            f"{result['length']} tokens: {result['correct']}/{result['prompts']} retrieved ({shown}, …)")  # fmt: skip


def _step_cost(run_dir: str, stage: str) -> dict:
    """Median train-step seconds of a stage (compile step excluded) and its total training seconds."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {}
    times = [r["step_time"] for r in read_metrics(path) if r.get("kind") == "train" and r.get("stage") == stage]
    if not times:
        return {}
    steady = sorted(times[1:] or times)
    return {"step_seconds": steady[len(steady) // 2], "train_seconds": float(sum(times))}


def _fits(length: int, seq: int, layout: str) -> bool:
    multiple = 2 * seq if layout == "zigzag" else seq
    return length % multiple == 0
