"""Text that training and evaluation share: tokenizers, haystacks and the synthetic sample generators.

The bottom layer of the project (it imports no other ringllama package), so a training data
mix and an eval score exactly the same prompts::

    from text import ByteTokenizer, passkey_sample
    s = passkey_sample(ByteTokenizer(), length=1024, depth=0.5, rng=0)   # depth: fraction in [0, 1]
    s.prompt_ids, s.answer_ids     # int32 [length], int32 [answer tokens]
    s.input_ids, s.loss_mask       # training view: prompt + answer, loss on the answer only
"""

from text.haystack import (
    FILLER,
    Haystack,
    HaystackError,
    TokenStream,
    haystack_text,
    load_haystack,
    read_documents,
    read_json,
    sentences_to_stream,
    token_stream,
)
from text.synthetic import (
    PASSKEY_INTRO,
    PASSKEY_TEMPLATES,
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
from text.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "FILLER",
    "PASSKEY_INTRO",
    "PASSKEY_TEMPLATES",
    "ByteTokenizer",
    "Haystack",
    "HaystackError",
    "OverheadError",
    "PromptFormat",
    "Sample",
    "TokenStream",
    "Tokenizer",
    "TokenizerError",
    "as_rng",
    "compose",
    "continuation_ids",
    "haystack_text",
    "load_haystack",
    "load_tokenizer",
    "multi_niah_sample",
    "niah_sample",
    "passkey_sample",
    "read_documents",
    "read_json",
    "sentences_to_stream",
    "token_stream",
]
