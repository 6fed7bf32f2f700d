"""Long-context evaluation: passkey, needle-in-a-haystack grids, RULER-style tasks, perplexity by position.

The synthetic-data generator (`evals.synthetic`) is shared with training data mixes::

    from evals import passkey_sample, niah_sample, ruler_sample, haystack_text
    s = passkey_sample(tokenizer, length=2048, depth=0.5, rng=0)   # depth: fraction in [0, 1]
    s.prompt_ids, s.answer_ids, s.answer, s.references, s.metadata

Running a model (`Runner`: teacher-forced or greedy, ring prefill on a mesh) and the CLI:
``python -m evals {passkey,niah,ruler,perplexity} --model PATH ...`` (`evals.cli`).
"""

from evals.evaluate import aggregate, evaluate
from evals.haystack import FILLER, Haystack, HaystackError, TokenStream, haystack_text, load_haystack, token_stream
from evals.loading import EvalInputError
from evals.qa import load_qa, qa_sample
from evals.ruler import RULER_TASKS, ruler_sample
from evals.runner import ForcedResult, Runner
from evals.scoring import forced_correct, string_match_all, string_match_part
from evals.synthetic import (
    PASSKEY_INTRO,
    OverheadError,
    PromptFormat,
    Sample,
    as_rng,
    compose,
    continuation_ids,
    multi_niah_sample,
    niah_sample,
    passkey_sample,
)
from evals.tasks import Cell, Task, grid

__all__ = [
    "FILLER",
    "PASSKEY_INTRO",
    "RULER_TASKS",
    "Cell",
    "EvalInputError",
    "ForcedResult",
    "Haystack",
    "HaystackError",
    "OverheadError",
    "PromptFormat",
    "Runner",
    "Sample",
    "Task",
    "TokenStream",
    "aggregate",
    "as_rng",
    "compose",
    "continuation_ids",
    "evaluate",
    "forced_correct",
    "grid",
    "haystack_text",
    "load_haystack",
    "load_qa",
    "multi_niah_sample",
    "niah_sample",
    "passkey_sample",
    "qa_sample",
    "ruler_sample",
    "string_match_all",
    "string_match_part",
    "token_stream",
]
