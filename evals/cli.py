"""``python -m evals {passkey,niah,ruler,perplexity}`` (console script ``ringllama-eval``).

The commands are the eval task registry's (`evals.tasks.TASKS`: each task names the command that
runs it) plus ``perplexity``, which scores plain text rather than generated samples.

    python -m evals niah --model ckpt/ --lengths 1k,2k,4k --depths 0:100:10 --samples 4 --out results/niah
    python -m evals ruler --model hf-dir/ --hf --lengths 4k,8k --mode generate --mesh data=1,sequence=8 --out r/
    python -m evals perplexity --model preset:tiny --lengths 1k,4k --data prose --out results/ppl

Bad input (missing model, unknown task, a length below the prompt overhead, an unreadable
file) prints one sentence and exits with status 2, leaving no results directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from evals.chat import llama3_chat_format
from evals.evaluate import aggregate, evaluate
from evals.loading import EvalInputError, check_vocab, load_eval_tokenizer, load_model, parse_mesh
from evals.perplexity import load_documents, perplexity_by_position
from evals.report import perplexity_table, summary_table, write_perplexity_results, write_task_results
from evals.runner import Runner
from evals.tasks import COMMANDS, TASKS, TaskSettings, cell_samples, command_tasks, grid
from text.haystack import HaystackError
from text.synthetic import PASSKEY_TEMPLATES, OverheadError

PERPLEXITY = "perplexity"  # the one command outside the task registry


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4k"`` → ``[1024, 2048, 4096]`` (k = 1024, m = 1048576; plain integers too)."""
    out = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        mult = {"k": 1 << 10, "m": 1 << 20}.get(part[-1], 1)
        try:
            value = float(part[:-1] if mult > 1 else part) * mult
        except ValueError:
            raise EvalInputError(f"bad length {part!r}: write lengths like 1k,2k,4096.") from None
        if value < 1 or value != int(value):
            raise EvalInputError(f"bad length {part!r}: lengths must be whole positive token counts.")
        out.append(int(value))
    if not out:
        raise EvalInputError("no lengths given: write e.g. --lengths 1k,2k,4k.")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    """Percents ``"0:100:10"`` (start:stop:step, stop included) or ``"0,50,100"`` → fractions in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if step <= 0:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            pct = [start + i * step for i in range(n)]
        else:
            pct = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvalInputError(
            f"bad depths {text!r}: write percents as start:stop:step (0:100:10) or 0,50,100."
        ) from None
    if not pct or any(p < 0 or p > 100 for p in pct):
        raise EvalInputError(f"bad depths {text!r}: depths are percents between 0 and 100.")
    return [round(p / 100, 6) for p in pct]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ringllama-eval", description="Long-context evals for ringllama and HF Llama.")
    p.add_argument("task", choices=(*COMMANDS, PERPLEXITY), help="which evaluation to run")
    p.add_argument("--model", required=True, help="ringllama checkpoint, HF directory, or preset:NAME (random init)")
    p.add_argument("--hf", action="store_true", help="require PATH to be a Hugging Face directory")
    p.add_argument("--lengths", default="1k,2k,4k", help="context lengths, e.g. 1k,2k,4k")
    p.add_argument("--depths", default="0:100:10", help="needle depths in percent: start:stop:step or a list")
    p.add_argument("--samples", type=int, default=4, help="samples per grid cell")
    p.add_argument("--mode", choices=("generate", "forced"), default="forced", help="greedy decoding or teacher-forced")
    p.add_argument("--out", required=True, help="results directory (replaced if it exists)")
    p.add_argument("--mesh", default=None, help="e.g. data=1,sequence=8: ring prefill over the sequence axis")
    p.add_argument("--tokenizer", default=None, help="'byte', a tokenizer.json or tokenizer.model (default: model's)")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the Llama 3 chat template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default=None, help="parameter dtype to load as (float32, bfloat16)")
    p.add_argument("--filler", default="classic", help="passkey filler: classic, prose or a text file")
    p.add_argument(
        "--template", choices=PASSKEY_TEMPLATES, default="classic", help="passkey prompt: classic, or short (no head)"
    )
    p.add_argument("--haystack", default="prose", help="niah haystack: prose, noise or a text file")
    p.add_argument("--needle", default=None, help="niah needle sentence")
    p.add_argument("--question", default=None, help="niah question")
    p.add_argument("--answer", default=None, help="niah expected answer")
    ruler = ",".join(n for n, spec in TASKS.items() if spec.command == "ruler")
    p.add_argument("--tasks", default=None, help=f"the command's tasks (default all; qa needs --qa-file): {ruler}")
    p.add_argument("--qa-file", default=None, help="SQuAD/HotpotQA JSON for the ruler qa task")
    p.add_argument("--data", default="prose", help="perplexity text: prose, .txt, .json(l) or a datasets dir")
    p.add_argument("--buckets", type=int, default=8, help="perplexity position buckets")
    p.add_argument("--ppl-mode", choices=("truncated", "sliding"), default="truncated")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride (default length/2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _tasks(args):
    settings = TaskSettings(
        filler=args.filler, template=args.template, haystack=args.haystack, needle=args.needle,
        question=args.question, answer=args.answer, qa_file=args.qa_file,
    )  # fmt: skip
    names = None if args.tasks is None else [n for n in (p.strip() for p in args.tasks.split(",")) if n]
    return command_tasks(args.task, settings, names)


def _run(args) -> int:

    lengths = parse_lengths(args.lengths)
    depths = parse_depths(args.depths)
    if args.samples < 1 or args.batch_size < 1:
        raise EvalInputError("--samples and --batch-size must be at least 1.")
    tasks = _tasks(args) if args.task != PERPLEXITY else []
    if args.task == PERPLEXITY:
        docs = load_documents(args.data)
    mesh = parse_mesh(args.mesh)
    if not args.model.startswith("preset:") and not os.path.isdir(args.model):
        raise EvalInputError(f"model {args.model} does not exist: give a ringllama checkpoint or HF model directory.")
    model_dir = args.model if os.path.isdir(args.model) else ""
    tokenizer = load_eval_tokenizer(model_dir, args.tokenizer)
    fmt = None
    if args.chat_template:
        try:
            fmt = llama3_chat_format(tokenizer)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from exc
    if args.task != PERPLEXITY:
        cells = grid(tasks, lengths, depths)
        for task in tasks:  # a length below the prompt overhead fails here, before the model loads
            first = next(c for c in cells if c.task == task.name)
            try:
                cell_samples(task, first, tokenizer, 1, args.seed, fmt)
            except OverheadError as exc:
                raise OverheadError(f"task {task.name}: {exc}") from exc
    t0 = time.perf_counter()
    config, params = load_model(args.model, hf=args.hf, dtype=args.dtype, mesh=mesh)
    check_vocab(tokenizer, config)

    runner = Runner(config, params, mesh=mesh, batch_size=args.batch_size, pad_id=tokenizer.pad_id)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(lengths=lengths, depths_percent=[d * 100 for d in depths], vocab_size=config.vocab_size)
    progress = not args.no_progress

    if args.task == PERPLEXITY:
        records = perplexity_by_position(
            runner, tokenizer, docs, lengths, samples=args.samples, buckets=args.buckets, mode=args.ppl_mode,
            stride=args.stride, progress=progress,
        )  # fmt: skip
        settings["seconds"] = round(time.perf_counter() - t0, 2)
        write_perplexity_results(args.out, settings, records)
        print(perplexity_table(records))
    else:
        records = evaluate(
            runner, tokenizer, tasks, cells, samples=args.samples, seed=args.seed, mode=args.mode, fmt=fmt,
            progress=progress,
        )  # fmt: skip
        aggregates = aggregate(records)
        settings["seconds"] = round(time.perf_counter() - t0, 2)
        depth_tasks = {t.name for t in tasks if t.uses_depth}
        write_task_results(args.out, settings, records, aggregates, depth_tasks)
        print(summary_table(aggregates, depth_tasks))
    print(f"results: {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # unknown task / flag: argparse prints usage and exits 2
    try:
        return _run(args)
    except (EvalInputError, OverheadError, HaystackError) as exc:
        print(f"ringllama-eval: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
