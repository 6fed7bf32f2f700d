"""Perplexity by position: does the loss keep falling past the context length a model was trained at?

Text comes from ``"prose"`` (the pydoc haystack), a ``.txt`` file (one document), a ``.json``/
``.jsonl`` file of ``{"text": ...}`` records, or a directory written by
`datasets.Dataset.save_to_disk` (column ``text``). Two modes:

- ``truncated``: each sample is one window of ``length`` tokens (a document's first tokens
  when documents are long enough, else evenly spaced windows of the concatenated text), BOS
  first; every position is scored, so the per-bucket loss shows how much context helps.
- ``sliding``: windows of ``length`` moved by ``stride``; only the last ``stride`` positions of
  each window after the first are scored (the standard sliding-window perplexity).

Positions are grouped into ``buckets`` equal-width buckets of ``[0, length)``.
"""

from __future__ import annotations

import math

import numpy as np
from tqdm.auto import tqdm

from evals.loading import EvalInputError
from text.haystack import HaystackError, haystack_text, read_documents


def load_documents(spec: str) -> list[str]:
    """Documents from ``"prose"``, a text / JSON(L) file or a saved `datasets` directory."""
    if spec == "prose":
        return [haystack_text()]
    try:
        return read_documents(spec)
    except HaystackError as exc:
        raise EvalInputError(str(exc)) from exc


def windows(tokenizer, docs: list[str], length: int, samples: int) -> tuple[np.ndarray, str]:
    """``[samples, length]`` token windows (BOS first when the tokenizer has one) and how they were cut."""
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    body = length - len(bos)
    encoded = [tokenizer.encode(d) for d in docs]
    long_docs = [e for e in encoded if len(e) >= body]
    if len(long_docs) >= samples:
        rows, source = [bos + e[:body] for e in long_docs[:samples]], "document prefixes"
    else:
        stream = [t for e in encoded for t in e]
        if len(stream) < body:
            raise EvalInputError(
                f"the text has only {len(stream)} tokens, fewer than the length {length}: "
                "give more text or a shorter length."
            )
        starts = np.linspace(0, len(stream) - body, samples).astype(int)
        rows, source = [bos + stream[s : s + body] for s in starts], "windows of the concatenated text"
    return np.asarray(rows, np.int32), source


def perplexity_by_position(
    runner,
    tokenizer,
    docs: list[str],
    lengths: list[int],
    *,
    samples: int = 4,
    buckets: int = 8,
    mode: str = "truncated",
    stride: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Mean NLL and perplexity per (length, position bucket); one record per bucket."""
    if mode not in ("truncated", "sliding"):
        raise EvalInputError(f"unknown perplexity mode {mode!r}: use truncated or sliding.")
    records = []
    it = lengths
    if progress:
        it = tqdm(lengths, desc="perplexity", unit="length")
    for length in it:
        if mode == "truncated":
            tokens, source = windows(tokenizer, docs, length, samples)
            nll = np.concatenate([runner.token_nll(tokens[i : i + 1]) for i in range(len(tokens))])  # [n, L-1]
            scored = np.ones_like(nll, bool)
        else:
            step = stride or length // 2
            stream = np.concatenate(windows(tokenizer, docs, length + step * (samples - 1), 1)[0])
            tokens = np.stack([stream[i * step : i * step + length] for i in range(samples)])
            source = f"sliding windows, stride {step}"
            nll = np.concatenate([runner.token_nll(tokens[i : i + 1]) for i in range(samples)])
            scored = np.zeros_like(nll, bool)
            scored[0] = True
            scored[1:, length - 1 - step :] = True
        # Position p of the NLL array predicts token p + 1: its context holds p + 1 tokens.
        pos = np.arange(1, length)
        edges = np.linspace(0, length, buckets + 1).astype(int)
        for b in range(buckets):
            in_b = (pos >= edges[b]) & (pos < edges[b + 1])
            vals = nll[:, in_b][scored[:, in_b]]
            mean = float(vals.mean()) if vals.size else math.nan
            records.append(
                {
                    "length": length,
                    "bucket": b,
                    "start": int(edges[b]),
                    "end": int(edges[b + 1]),
                    "tokens": int(vals.size),
                    "nll": mean,
                    "ppl": math.exp(mean) if vals.size else math.nan,
                    "mode": mode,
                    "source": source,
                }
            )
    return records
