"""What a run reports: end-of-stage evals, the final model and its export, ``report.json``, a summary.

`Reporter.end_of_stage` runs held-out perplexity (the stage's length and the next stage's, still
with this stage's θ) and, when ``eval.passkey_lengths`` is set, the passkey grid — printing the
accuracy table of every stage so far and writing ``<run_dir>/passkey/<stage>/`` (results.json,
CSVs, heatmap PNG). `Reporter.finish` saves the final model as a ringllama checkpoint
(``<run_dir>/final``: its config carries the last stage's θ and max positions), exports it to
Hugging Face format when asked, checks that transformers loads it with matching logits, and
writes ``report.json`` (also after every stage, so a resumed run keeps earlier results).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jax

from train.config import StagePlan, TrainConfig
from train.stage_eval import heldout_perplexity, passkey_grid, passkey_table, write_passkey_results


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
        self.data["config"] = _cfg_dict(cfg)

    def has_stage(self, name: str) -> bool:
        return name in self.data["stages"]

    def _write(self) -> None:
        if not self.lead:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=1)
        os.replace(tmp, self.path)

    def end_of_stage(self, state, plan: StagePlan, nxt: StagePlan | None, mesh, global_step: int) -> list[dict]:
        """Evaluate the stage's final params; returns metrics records (kind ``eval``)."""
        cfg, stage, t0 = self.cfg, plan.stage, time.time()
        out = {"seq_len": stage.seq_len, "theta": plan.model.rope.theta, "steps": stage.steps,
               "max_position_embeddings": plan.model.max_position_embeddings, "global_step": global_step,
               "perplexity": {}}  # fmt: skip
        records = []
        lengths = [(stage.seq_len, stage.batch_size)]
        seq = dict(mesh.shape)["sequence"]
        if nxt is not None and nxt.stage.seq_len != stage.seq_len and _fits(nxt.stage.seq_len, seq, plan.layout):
            lengths.append((nxt.stage.seq_len, nxt.stage.batch_size))
        if cfg.eval.heldout_batches > 0:
            for length, batch in lengths:
                ppl = heldout_perplexity(
                    state.params, plan.model, mesh, plan.data, seq_len=length,
                    batch_size=cfg.eval.heldout_batch_size or batch, n_batches=cfg.eval.heldout_batches,
                    seed=cfg.seed, layout=plan.layout, loss_chunk=cfg.loss_chunk,
                )  # fmt: skip
                out["perplexity"][str(length)] = ppl["perplexity"]
                records.append({"kind": "eval", "stage": plan.name, "step": global_step, **ppl})
                self.say(f"{plan.name}: held-out perplexity at {length} tokens = {ppl['perplexity']:.3f}")
        if cfg.eval.passkey_lengths:
            out["passkey"] = self._passkey(state, plan, mesh)
        out["eval_seconds"] = time.time() - t0
        self.data["stages"][plan.name] = out
        self._write()
        return records

    def _passkey(self, state, plan: StagePlan, mesh) -> dict:
        from train.tokenizer import load_tokenizer

        ev = self.cfg.eval
        records, agg = passkey_grid(
            state.params, plan.model, mesh, load_tokenizer(plan.data.tokenizer), lengths=ev.passkey_lengths,
            samples=ev.passkey_samples, depths=ev.passkey_depths, filler=ev.passkey_filler,
            batch_size=ev.passkey_batch, seed=self.cfg.seed + 7,
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
        self._write()
        if not stopped:
            self.say(self.summary())
        return RunResult(self.run_dir, global_step, stopped, self.data, plan.model)

    def _final_model(self, state, plan: StagePlan) -> None:
        if jax.process_count() > 1:
            self.say("multi-process run: the final weights are the last checkpoint in checkpoints/ (no export)")
            return
        from train.export import check_transformers, export_final

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
            lines += _extension_verdict(stages)
        if "hf_export" in self.data:
            lines.append(f"\nHugging Face export: {self.data['hf_export']}")
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


RETRIEVAL_TARGET = 0.9


def _fits(length: int, seq: int, layout: str) -> bool:
    multiple = 2 * seq if layout == "zigzag" else seq
    return length % multiple == 0


def _cfg_dict(cfg: TrainConfig) -> dict:
    from train.typed import to_dict

    return to_dict(cfg)
