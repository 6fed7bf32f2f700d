"""Chat framing for prompts: the Llama 3 instruct template as a `PromptFormat`.

``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>``
``<|start_header_id|>assistant<|end_header_id|>\\n\\n{answer prefix}`` — the question goes in the
user turn and the answer prefix starts the assistant turn (as RULER does).
"""

from __future__ import annotations

from text.synthetic import PromptFormat

_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def _special_id(tokenizer, token: str) -> int | None:
    """The id of a special token, for the tokenizer kinds of `text.tokenizer` (None if absent)."""
    hf = getattr(tokenizer, "_tok", None)  # HFTokenizer wraps a tokenizers.Tokenizer
    if hf is not None:
        return hf.token_to_id(token)
    enc = getattr(tokenizer, "_enc", None)  # TiktokenTokenizer wraps a tiktoken.Encoding
    if enc is not None:
        try:
            return enc.encode_single_token(token)
        except KeyError:
            return None
    return None


def llama3_chat_format(tokenizer) -> PromptFormat:
    """The Llama 3 chat frame for ``tokenizer``; raises ValueError when it lacks the chat tokens."""
    ids = {t: _special_id(tokenizer, t) for t in _SPECIALS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(
            f"--chat-template needs a tokenizer with Llama 3 chat tokens; this one lacks {', '.join(missing)}: "
            "drop --chat-template or give the instruct model's tokenizer."
        )
    head = [ids["<|begin_of_text|>"], ids["<|start_header_id|>"]]
    head += tokenizer.encode("user") + [ids["<|end_header_id|>"]] + tokenizer.encode("\n\n")
    turn = [ids["<|eot_id|>"], ids["<|start_header_id|>"]]
    turn += tokenizer.encode("assistant") + [ids["<|end_header_id|>"]] + tokenizer.encode("\n\n")
    return PromptFormat(prefix_ids=tuple(head), turn_ids=tuple(turn), joiner="")
