"""End-of-stage evaluation: held-out perplexity at given lengths and a passkey retrieval grid.

Both run on the training mesh with the stage's params where they already live (no gather):
perplexity through the engine's jitted eval step on held-out batches in the ring layout,
passkey through `evals.Runner` (teacher-forced: correct iff every answer token is the argmax),
with ring attention when the mesh has a ``sequence`` axis.

Held-out perplexity counts every target token once (the loss mask is binarised), so source
weights such as ``answer_weight`` shape training but not the reported perplexity.

A passkey "context of L tokens" is the whole scored sequence — prompt plus answer — so the
prompt is L − `PASSKEY_RESERVE` tokens; a model trained at L is never scored past position L.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from evals.evaluate import aggregate, evaluate
from evals.report import write_task_results
from evals.runner import Runner
from evals.tasks import TaskSettings, grid, make_task
from model.config import LlamaConfig
from train.data import heldout_batches
from train.data_config import DataConfig

# Room for the answer (byte tokenizer: a space and 5 digits) plus slack, inside the context length.
PASSKEY_RESERVE = 8


def heldout_perplexity(
    params: Any,
    eval_step: Callable[[Any, dict], tuple[Any, Any]],
    mesh: jax.sharding.Mesh,
    data_cfg: DataConfig,
    *,
    seq_len: int,
    batch_size: int,
    n_batches: int,
    seed: int,
    layout: str,
) -> dict[str, float]:
    """Perplexity over ``n_batches`` held-out batches ``[batch_size, seq_len]`` (same batches every call).

    ``eval_step`` is the stage's ``(params, batch) -> (loss_sum, count)`` for rows of ``seq_len``
    (`train.stage.Engine.eval_step`).
    """
    num_shards = dict(mesh.shape).get("sequence", 1)
    batches = heldout_batches(
        data_cfg,
        seq_len,
        batch_size,
        n_batches,
        seed,
        layout=layout,
        num_shards=num_shards,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total, count = 0.0, 0.0
    for batch in batches:
        batch = dict(batch, loss_mask=(np.asarray(batch["loss_mask"]) > 0).astype(np.float32))
        loss_sum, n = eval_step(params, batch)
        total += float(loss_sum)
        count += float(n)
    loss = total / max(count, 1.0)
    return {"seq_len": seq_len, "loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": count}


def passkey_grid(
    params: Any,
    model_cfg: LlamaConfig,
    mesh: jax.sharding.Mesh,
    tokenizer,
    *,
    lengths: tuple[int, ...],
    samples: int,
    depths: tuple[float, ...],
    filler: str,
    batch_size: int,
    template: str = "classic",
    seed: int,
) -> tuple[list[dict], dict]:
    """Teacher-forced passkey accuracy for every (length, depth) cell: ``(records, aggregates)``.

    ``samples`` prompts per length are spread evenly over ``depths`` (at least one per depth).
    Lengths are context lengths (prompt + answer, see the module docstring); records carry them.
    """
    data_shards = dict(mesh.shape).get("data", 1) * dict(mesh.shape).get("fsdp", 1)
    batch_size = max(data_shards, -(-batch_size // data_shards) * data_shards)
    runner = Runner(model_cfg, params, mesh=mesh, batch_size=batch_size, pad_multiple=8, pad_id=tokenizer.pad_id)
    task = make_task("passkey", TaskSettings(filler=filler, template=template))
    per_depth = max(1, samples // max(len(depths), 1))
    records = []
    for length in lengths:
        cells = grid([task], [length - PASSKEY_RESERVE], depths)
        for r in evaluate(
            runner, tokenizer, [task], cells, samples=per_depth, seed=seed, mode="forced", progress=False
        ):
            records.append(dict(r, length=length, prompt_length=length - PASSKEY_RESERVE))
    return records, aggregate(records)


def passkey_table(by_stage: dict[str, dict], lengths: tuple[int, ...]) -> str:
    """Accuracy per stage (rows) and context length (columns), from `passkey_grid` aggregates."""
    head = f"{'passkey accuracy':<22}" + "".join(f"{n:>8}" for n in lengths)
    lines = [head, "-" * len(head)]
    for stage, agg in by_stage.items():
        scores = {r["length"]: r["score"] for r in agg["by_length"]}
        lines.append(f"{stage:<22}" + "".join(f"{scores.get(n, math.nan):>8.0%}" for n in lengths))
    return "\n".join(lines)


def write_passkey_results(out_dir: str, settings: dict, records: list[dict], aggregates: dict) -> str:
    """JSON, CSV and the heatmap PNG (`evals.report`), written atomically into ``out_dir``."""
    if os.path.isdir(out_dir):  # a re-run of the same stage replaces its own results
        shutil.rmtree(out_dir)
    return write_task_results(out_dir, settings, records, aggregates, depth_tasks={"passkey"})
