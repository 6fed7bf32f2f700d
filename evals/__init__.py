"""Long-context evaluation: passkey, needle-in-a-haystack grids, RULER-style tasks, perplexity by position.

The synthetic-data generator (`evals.synthetic`) is shared with training data mixes::

    from evals import passkey_sample, niah_sample, haystack_text
    s = passkey_sample(tokenizer, length=2048, depth=0.5, rng=0)   # depth: fraction in [0, 1]
    s.prompt_ids, s.answer_ids, s.answer, s.references, s.metadata
"""

from evals.haystack import FILLER, Haystack, HaystackError, TokenStream, haystack_text, load_haystack, token_stream
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

__all__ = [
    "FILLER",
    "Haystack",
    "HaystackError",
    "OverheadError",
    "PASSKEY_INTRO",
    "PromptFormat",
    "Sample",
    "TokenStream",
    "as_rng",
    "compose",
    "continuation_ids",
    "haystack_text",
    "load_haystack",
    "multi_niah_sample",
    "niah_sample",
    "passkey_sample",
    "token_stream",
]
