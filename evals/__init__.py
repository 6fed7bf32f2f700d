"""Long-context evaluation: passkey, needle-in-a-haystack grids, RULER-style tasks, perplexity by position.

The sample generators the evals score (passkey, NIAH, haystacks) live in `text`, shared with
training data mixes; RULER and QA tasks build on them here::

    from evals import ruler_sample
    s = ruler_sample("niah_multikey_1", tokenizer, length=2048, rng=0)
    s.prompt_ids, s.answer_ids, s.answer, s.references, s.metadata

Every task the evals run is one entry of the registry `TASKS` (`evals.tasks`), shared by the CLI
and the end-of-stage evals::

    task = make_task("passkey", TaskSettings(template="short"))   # a Task: name, make, metric, uses_depth

Running a model (`Runner`: teacher-forced or greedy, ring prefill on a mesh) and the CLI:
``python -m evals {passkey,niah,ruler,perplexity} --model PATH ...`` (`evals.cli`).
"""

from evals.evaluate import aggregate, evaluate
from evals.loading import EvalInputError
from evals.qa import load_qa, qa_sample
from evals.ruler import RULER_TASKS, ruler_sample
from evals.runner import ForcedResult, Runner
from evals.scoring import forced_correct, string_match_all, string_match_part
from evals.tasks import TASKS, Cell, Task, TaskSettings, TaskSpec, command_tasks, grid, make_task

__all__ = [
    "RULER_TASKS",
    "TASKS",
    "Cell",
    "EvalInputError",
    "ForcedResult",
    "Runner",
    "Task",
    "TaskSettings",
    "TaskSpec",
    "aggregate",
    "command_tasks",
    "evaluate",
    "forced_correct",
    "grid",
    "load_qa",
    "make_task",
    "qa_sample",
    "ruler_sample",
    "string_match_all",
    "string_match_part",
]
