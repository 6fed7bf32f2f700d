"""RULER-style synthetic tasks (Hsieh et al., 2024), re-implemented on the shared generator.

Tasks (`RULER_TASKS`, name → sample generator): ``niah_single_1/2/3``, ``niah_multikey_1/2/3``, ``niah_multivalue``,
``niah_multiquery``, ``vt`` (variable tracking), ``cwe`` (common words), ``fwe`` (frequent
words); QA lives in `evals.qa`. Settings follow RULER's defaults: single needles on the noise
haystack (1) or prose (2, 3); keys are hyphenated word pairs, values 7-digit numbers or UUIDs;
multikey_1 hides 3 distractor keys in prose, multikey_2/3 make the whole haystack out of
distractor needles (the all-distractor variant); multivalue hides 4 values under one key,
multiquery asks for 4 keys; vt hides a 4-hop chain; cwe asks for the 10 words repeated most
in a numbered list; fwe for the 3 most frequent coded words of a Zipf(2) stream.

Words come from the pydoc prose vocabulary (no word-list download). Every prompt is exactly
``length`` tokens; score with `evals.scoring.string_match_all` (fraction of references found).
"""

from __future__ import annotations

import functools
import re
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from text.haystack import haystack_text, sentences_to_stream
from text.synthetic import OverheadError, PromptFormat, Sample, as_rng, compose

_NIAH_HEAD = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards."
)
_NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
_NIAH_ANSWER = "The special magic {kind} for {query} mentioned in the provided text are"

# name: (haystack, key kind, value kind, number of keys, values, queries)
_NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("prose", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("prose", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("prose", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needles", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needles", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("prose", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("prose", "words", "numbers", 4, 1, 4),
}


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words (4–10 letters) of the pydoc prose, in first-seen order."""
    seen = dict.fromkeys(w for w in re.findall(r"\b[a-z]{4,10}\b", haystack_text()))
    return tuple(seen)


def _draw(rng: np.random.Generator, kind: str, n: int) -> list[str]:
    """``n`` distinct keys/values: ``words`` (word-pair), ``numbers`` (7 digits) or ``uuids``."""
    out: dict[str, None] = {}
    vocab = vocabulary()
    while len(out) < n:
        if kind == "words":
            a, b = rng.integers(len(vocab), size=2)
            out[f"{vocab[a]}-{vocab[b]}"] = None
        elif kind == "numbers":
            out[str(int(rng.integers(1_000_000, 10_000_000)))] = None
        else:
            out[str(uuid.UUID(bytes=rng.bytes(16), version=4))] = None
    return list(out)


def ruler_niah_sample(
    name: str, tokenizer, length: int, rng, fmt: PromptFormat | None = None, depth: float | None = None
) -> Sample:
    """A RULER NIAH variant; needles at random depths unless ``depth`` pins the first (queried) one."""
    rng = as_rng(rng)
    haystack, key_kind, value_kind, n_keys, n_values, n_queries = _NIAH[name]
    keys = _draw(rng, key_kind, n_keys)
    values = [_draw(rng, value_kind, n_values) for _ in keys]
    needles_text = [
        _NIAH_NEEDLE.format(kind=value_kind, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs
    ]
    depths = [float(x) for x in rng.uniform(0, 1, size=len(needles_text))]
    if depth is not None:
        depths[0] = float(depth)
    queried = keys[:n_queries]
    query = queried[0] if n_queries == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    refs = [v for vs in values[:n_queries] for v in vs]
    if haystack == "needles":
        # The all-distractor haystack: every sentence is a needle for some other key.
        per_needle = len(tokenizer.encode(" " + needles_text[0]))
        n = length // max(per_needle, 1) + 8
        d_keys, d_vals = _draw(rng, key_kind, n + 1), _draw(rng, value_kind, n)
        d_keys = [k for k in d_keys if k not in keys][:n]
        sentences = [_NIAH_NEEDLE.format(kind=value_kind, key=k, value=v) for k, v in zip(d_keys, d_vals, strict=False)]
        haystack = _stream_at_least(tokenizer, sentences, length)
    return compose(
        tokenizer,
        length,
        head=_NIAH_HEAD.format(kind=value_kind),
        question=_NIAH_QUESTION.format(kind=value_kind, query=query),
        answer_prefix=_NIAH_ANSWER.format(kind=value_kind, query=query),
        answer=", ".join(refs),
        needles=list(zip(depths, needles_text, strict=True)),
        haystack=haystack,
        rng=rng,
        references=refs,
        metadata={"task": name, "depth": depth if depth is not None else depths[0]},
        fmt=fmt,
    )


def _stream_at_least(tokenizer, sentences: list[str], length: int):
    """A stream of ``sentences`` tokenized once, extended (by more of the same) to ≥ ``length`` tokens."""
    stream = sentences_to_stream(tokenizer, sentences)
    if len(stream.ids) < length:  # only for tiny lengths; take() would wrap and repeat needles
        reps = length // max(len(stream.ids), 1) + 1
        stream = sentences_to_stream(tokenizer, sentences * reps)
    return stream


def vt_sample(tokenizer, length: int, rng, fmt: PromptFormat | None = None, hops: int = 4, chains: int = 1) -> Sample:
    """Variable tracking: ``VAR A = 12345``, ``VAR B = VAR A`` … spread over the noise haystack."""
    rng = as_rng(rng)
    names = _draw_names(rng, (hops + 1) * chains)
    numbers = _draw(rng, "numbers", chains)
    needles, refs = [], []
    for c in range(chains):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        stmts = [f"VAR {chain[0]} = {numbers[c]}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)
        ]
        # Hops in order, at evenly spread depths with a little jitter.
        base = np.linspace(0.05, 0.95, len(stmts)) + rng.uniform(-0.03, 0.03, len(stmts))
        needles += list(zip(np.clip(base, 0, 1).tolist(), stmts, strict=True))
        if c == 0:
            refs = chain
    value = numbers[0]
    return compose(
        tokenizer,
        length,
        head="Memorize and track the chain(s) of variable assignment hidden in the following text.",
        question=f"Question: Find all variables that are assigned the value {value} in the text above.",
        answer_prefix=(
            "Answer: According to the chain(s) of variable assignment in the text above, "
            f"{len(refs)} variables are assigned the value {value}, they are:"
        ),
        answer=" ".join(refs),
        needles=needles,
        haystack="noise",
        rng=rng,
        references=refs,
        metadata={"task": "vt", "hops": hops, "chains": chains},
        fmt=fmt,
    )


def _draw_names(rng: np.random.Generator, n: int) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(chr(65 + int(c)) for c in rng.integers(26, size=5))] = None
    return list(out)


def _fit_items(tokenizer, items: list[str], budget: int):
    """The longest prefix of ``items`` whose tokens fit ``budget``; the rest of the budget is spaces.

    Returns ``(stream, kept, used)``: a stream of exactly ``budget`` tokens, the items kept and
    the tokens they take.
    """
    pieces = [tokenizer.encode(" " + s) for s in items]
    cum = np.cumsum([len(p) for p in pieces])
    kept = int(np.searchsorted(cum, budget, side="right"))
    stream = sentences_to_stream(tokenizer, items[:kept] or ["."])
    used = len(stream.ids)
    pad = budget - used
    if pad > 0:
        space = tokenizer.encode(" ")[:1] or stream.ids[:1].tolist()
        stream = type(stream)(np.concatenate([stream.ids, np.full(pad, space[0], np.int32)]), stream.starts)
    return stream, kept, used


def _list_sample(tokenizer, length, rng, fmt, head, question, answer_prefix, make_items, n_refs, name, numbered):
    """Shared by cwe/fwe: items fill the haystack budget; references are the ``n_refs`` most frequent."""
    probe = compose(
        tokenizer, length, head=head, question=question, answer_prefix=answer_prefix, answer="x", haystack="noise",
        rng=0, fmt=fmt,
    )  # fmt: skip
    budget = len(probe.prompt_ids) - probe.metadata["overhead"]
    per_item = np.mean(
        [len(tokenizer.encode(f" {i}. {w}" if numbered else " " + w)) for i, w in enumerate(vocabulary()[:50])]
    )
    n_items = int(budget / per_item * 1.1) + 1
    for attempt in range(30):
        words, meta = make_items(rng, n_items)
        items = [f"{i + 1}. {w}" for i, w in enumerate(words)] if numbered else words
        stream, kept, used = _fit_items(tokenizer, items, budget)
        if kept == len(items) and used < 0.98 * budget and attempt < 20:  # too few items: draw more
            n_items = int(n_items * budget / max(used, 1) * 1.05) + 1
            continue
        counts = Counter(words[:kept]).most_common()
        if len(counts) > n_refs and counts[n_refs - 1][1] > counts[n_refs][1]:
            refs = [w for w, _ in counts[:n_refs]]
            break
        if attempt % 3 == 2:  # redraw twice (ties), then suspect the cut and draw fewer items
            n_items = int(n_items * 0.9)
    else:
        raise OverheadError(f"length {length} is too short for {name}: use a longer length.")
    return compose(
        tokenizer,
        length,
        head=head,
        question=question,
        answer_prefix=answer_prefix,
        answer=", ".join(refs),
        haystack=stream,
        rng=rng,
        references=refs,
        metadata={"task": name, "items": kept, **meta},
        fmt=fmt,
    )


def cwe_sample(tokenizer, length: int, rng, fmt: PromptFormat | None = None, num_common: int = 10) -> Sample:
    """Common words extraction: a numbered list where ``num_common`` words repeat most (30× vs 3×)."""
    rng = as_rng(rng)
    vocab = vocabulary()

    def make(rng, n_items):
        # RULER's 30×/3× when the list is long enough; shorter lists scale the counts down.
        freq_common = int(min(30, max(2, n_items // (2 * num_common))))
        freq_rare = 3 if freq_common > 3 else 1
        n_rare = max(1, (n_items - freq_common * num_common) // freq_rare)
        if n_rare > len(vocab) - num_common:  # very long lists: repeat the rare words more (still < common)
            n_rare = len(vocab) - num_common
            freq_rare = int(min(freq_common - 1, -(-(n_items - freq_common * num_common) // n_rare)))
        picked = [vocab[i] for i in rng.choice(len(vocab), size=num_common + n_rare, replace=False)]
        words = picked[:num_common] * freq_common + picked[num_common:] * freq_rare
        order = rng.permutation(len(words))
        return [words[i] for i in order], {"freq_common": freq_common, "freq_rare": freq_rare}

    head = (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    question = f"Question: What are the {num_common} most common words in the above list?"
    prefix = f"Answer: The top {num_common} words that appear most often in the list are:"
    return _list_sample(tokenizer, length, rng, fmt, head, question, prefix, make, num_common, "cwe", True)


def fwe_sample(tokenizer, length: int, rng, fmt: PromptFormat | None = None, alpha: float = 2.0) -> Sample:
    """Frequent words extraction: coded words drawn from a Zipf(``alpha``) law; find the top 3."""
    rng = as_rng(rng)

    def make(rng, n_items):
        vocab_size = max(20, n_items // 10)
        coded = [
            "".join(chr(97 + int(c)) for c in rng.integers(26, size=int(rng.integers(3, 7)))) for _ in range(vocab_size)
        ]
        coded = list(dict.fromkeys(coded))
        probs = 1.0 / np.arange(1, len(coded) + 1) ** alpha
        draws = rng.choice(len(coded), size=n_items, p=probs / probs.sum())
        return [coded[i] for i in draws], {"alpha": alpha}

    head = (
        "Read the following coded text and track the frequency of each coded word. "
        "Find the three most frequently appeared coded words."
    )
    question = "Question: What are the three most frequently appeared words in the above coded text?"
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    return _list_sample(tokenizer, length, rng, fmt, head, question, prefix, make, 3, "fwe", False)


# name -> (tokenizer, length, rng, fmt, depth) -> Sample: RULER's tasks, and the rows `evals.tasks.TASKS` takes
# them from. ``depth`` pins the queried needle of the NIAH variants; the other tasks place their own.
RULER_TASKS: dict[str, Callable[..., Sample]] = {
    **{name: functools.partial(ruler_niah_sample, name) for name in _NIAH},
    "vt": lambda tokenizer, length, rng, fmt, depth: vt_sample(tokenizer, length, rng, fmt),
    "cwe": lambda tokenizer, length, rng, fmt, depth: cwe_sample(tokenizer, length, rng, fmt),
    "fwe": lambda tokenizer, length, rng, fmt, depth: fwe_sample(tokenizer, length, rng, fmt),
}


def ruler_sample(
    name: str, tokenizer, length: int, rng, fmt: PromptFormat | None = None, depth: float | None = None
) -> Sample:
    """One sample of RULER task ``name`` (a key of `RULER_TASKS`)."""
    if name not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {name!r}: use one of {', '.join(RULER_TASKS)}.")
    return RULER_TASKS[name](tokenizer, length, rng, fmt, depth)
