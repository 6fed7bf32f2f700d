"""The one deterministic synthetic-data generator, shared by training data mixes and evals.

Every generator returns a `Sample` whose prompt is exactly ``length`` tokens (BOS and any chat
framing included): the instruction head, ``length − overhead`` haystack tokens read from a
cached token stream, the needle(s) inserted at sentence boundaries nearest the requested
depths, and the question. Prompts are assembled from separately tokenized pieces, so they
are cheap (microseconds after the first call per tokenizer) and of exact length.

Conventions:
- ``depth`` is a **fraction in [0, 1]** of the haystack (0 = right after the instructions,
  1 = right before the question); the CLI takes percents and divides by 100.
- ``rng`` is a `numpy.random.Generator` (advanced in place) or an int seed (a fresh
  ``default_rng(seed)``); the same seed always gives the same sample.
- ``tokenizer`` is any object with ``encode``/``decode``/``bos_id``/``eos_id``/``pad_id``/
  ``vocab_size`` (e.g. `text.tokenizer.ByteTokenizer`).

    from text import passkey_sample
    s = passkey_sample(ByteTokenizer(), length=1024, depth=0.5, rng=0)
    tokens, mask = s.input_ids, s.loss_mask        # training: loss on the answer only
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from text.haystack import Haystack, TokenStream, load_haystack, token_stream

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_QUESTION = "What is the pass key?"
# "classic": the intro, then filler with the needle, then the question. "short": the same without the
# intro (~150 byte tokens), so that a short context is mostly haystack and the needle's depth varies.
PASSKEY_TEMPLATES = ("classic", "short")
PASSKEY_ANSWER_PREFIX = "The pass key is"

NIAH_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NIAH_QUESTION = "What is the best thing to do in San Francisco?"
NIAH_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
NIAH_INTRO = "Read the following text carefully. A question about it follows at the end."


class OverheadError(ValueError):
    """The requested length cannot hold the task's fixed text; the message gives the minimum."""


@dataclass(frozen=True)
class Sample:
    """One prompt and its expected continuation.

    Attributes:
        prompt_ids: the prompt, ``length`` token ids.
        answer_ids: the expected continuation's token ids (teacher-forced target; no EOS).
        answer: the continuation as text (what ``answer_ids`` decode to, stripped).
        references: strings a generated answer must contain (RULER scoring); default ``(answer,)``.
        metadata: ``task``, ``length``, ``depth`` (requested), ``needle_depths`` (actual), …
    """

    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str
    references: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        """Prompt followed by the answer: a training sequence."""
        return self.prompt_ids + self.answer_ids

    @property
    def loss_mask(self) -> list[int]:
        """1 on the positions whose *next* token is an answer token (for ``input_ids[:-1] → [1:]`` losses)."""
        p, a = len(self.prompt_ids), len(self.answer_ids)
        return [0] * (p - 1) + [1] * a + [0]


@dataclass(frozen=True)
class PromptFormat:
    """How the pieces are framed: token ids before the text, and between the question and the answer prefix.

    Plain (default): ``[bos] head … question answer_prefix`` with ``joiner`` (a space) before the
    answer prefix. Chat formats (`evals.chat`) put the user-turn header in ``prefix_ids`` and the
    end-of-turn + assistant header in ``turn_ids``.
    """

    prefix_ids: tuple[int, ...] = ()
    turn_ids: tuple[int, ...] = ()
    joiner: str = " "

    @staticmethod
    def plain(tokenizer, add_bos: bool = True) -> PromptFormat:
        bos = getattr(tokenizer, "bos_id", None)
        return PromptFormat(prefix_ids=(bos,) if add_bos and bos is not None else ())


def as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A Generator from a Generator (returned as is), an int seed or None (seed 0)."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else int(rng))


def continuation_ids(tokenizer, context: str, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer would split it right after ``context``."""
    ctx = tokenizer.encode(context) if context else []
    full = tokenizer.encode(context + text)
    if len(full) > len(ctx) and full[: len(ctx)] == ctx:
        return list(full[len(ctx) :])
    return list(tokenizer.encode(text))


def _check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth {depth} is outside [0, 1]: pass a fraction of the haystack (50% → 0.5).")
    return float(depth)


def compose(
    tokenizer,
    length: int,
    *,
    head: str,
    question: str,
    answer_prefix: str,
    answer: str,
    needles: Sequence[tuple[float, str]] = (),
    haystack: str | Haystack | TokenStream = "prose",
    rng: np.random.Generator | int | None = None,
    references: Sequence[str] | None = None,
    metadata: dict | None = None,
    fmt: PromptFormat | None = None,
) -> Sample:
    """Assemble an exact-length prompt: head, haystack with needles at depths, question, answer prefix.

    Args:
        length: total prompt tokens, framing included.
        head: instructions before the haystack (may be empty).
        question, answer_prefix: after the haystack; the answer continues ``answer_prefix``.
        answer: the expected continuation (tokenized after ``answer_prefix`` plus a space).
        needles: ``(depth, sentence)`` pairs; depth a fraction of the haystack in [0, 1].
        haystack: a name/path for `load_haystack`, a `Haystack`, or a ready `TokenStream`.
        rng: picks the haystack's starting sentence (for haystacks with ``random_start``).

    Raises:
        OverheadError: when ``length`` is smaller than the fixed text.
    """
    rng = as_rng(rng)
    fmt = fmt or PromptFormat.plain(tokenizer)
    head_ids = list(fmt.prefix_ids) + (tokenizer.encode(head + "\n") if head else [])
    if fmt.turn_ids:
        tail_ids = tokenizer.encode("\n" + question) + list(fmt.turn_ids)
        tail_ids += tokenizer.encode(answer_prefix) if answer_prefix else []
        context, sep = answer_prefix, " " if answer_prefix else ""
    else:
        tail_text = "\n" + question + (fmt.joiner + answer_prefix if answer_prefix else "")
        tail_ids = tokenizer.encode(tail_text)
        context, sep = tail_text, " "
    needle_ids = [(_check_depth(d), tokenizer.encode(" " + text)) for d, text in needles]
    overhead = len(head_ids) + len(tail_ids) + sum(len(ids) for _, ids in needle_ids)
    budget = length - overhead
    if budget < 0:
        raise OverheadError(f"length {length} is below the prompt overhead of {overhead} tokens: use a longer length.")

    if isinstance(haystack, TokenStream):
        stream, random_start = haystack, False
    else:
        hay = load_haystack(haystack)
        stream, random_start = token_stream(tokenizer, hay), hay.random_start
    first = int(rng.integers(len(stream.starts))) if random_start else 0
    hay_ids, bounds = stream.take(first, budget)

    # Needles go at the sentence boundary nearest each requested depth (ties: the earlier one).
    placed = []
    for order, (depth, ids) in enumerate(needle_ids):
        at = int(bounds[np.argmin(np.abs(bounds - depth * budget))])
        placed.append((at, order, ids))
    placed.sort()
    pieces, cursor, starts, depths = [np.asarray(head_ids, np.int32)], 0, [0] * len(placed), [0.0] * len(placed)
    offset = len(head_ids)
    for at, order, ids in placed:
        pieces.append(hay_ids[cursor:at])
        offset += at - cursor
        starts[order], depths[order] = offset, round(at / max(budget, 1), 4)
        pieces.append(np.asarray(ids, np.int32))
        offset += len(ids)
        cursor = at
    pieces += [hay_ids[cursor:], np.asarray(tail_ids, np.int32)]
    prompt = np.concatenate(pieces).astype(np.int64).tolist()
    meta = {
        "length": length,
        "prompt_tokens": len(prompt),
        "overhead": overhead,
        "needle_token_starts": starts,
        "needle_depths": depths,  # where each needle went: haystack tokens before it / all haystack tokens
        "haystack_start_sentence": first,
    }
    meta.update(metadata or {})
    answer_ids = continuation_ids(tokenizer, context, sep + answer)
    refs = tuple(references) if references is not None else (answer,)
    return Sample(prompt, answer_ids, answer, refs, meta)


def passkey_sample(
    tokenizer,
    length: int,
    depth: float,
    rng: np.random.Generator | int | None = None,
    filler: str = "classic",
    fmt: PromptFormat | None = None,
    template: str = "classic",
) -> Sample:
    """The classic passkey prompt: a random 5-digit key hidden at ``depth`` in repeated filler.

    Args:
        filler: ``"classic"`` (the grass-is-green filler), ``"prose"`` (pydoc prose) or any
            `load_haystack` spec.
        template: ``"classic"`` or ``"short"`` (no instruction head; see `PASSKEY_TEMPLATES`).
    """
    if template not in PASSKEY_TEMPLATES:
        raise ValueError(f"passkey template {template!r} is unknown: use one of {', '.join(PASSKEY_TEMPLATES)}.")
    rng = as_rng(rng)
    key = str(int(rng.integers(10000, 100000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return compose(
        tokenizer,
        length,
        head=PASSKEY_INTRO if template == "classic" else "",
        question=PASSKEY_QUESTION,
        answer_prefix=PASSKEY_ANSWER_PREFIX,
        answer=key,
        needles=[(depth, needle)],
        haystack=filler,
        rng=rng,
        metadata={"task": "passkey", "depth": depth, "filler": str(filler), "template": template},
        fmt=fmt,
    )


def niah_sample(
    tokenizer,
    length: int,
    depth: float,
    rng: np.random.Generator | int | None = None,
    needle: str = NIAH_NEEDLE,
    question: str = NIAH_QUESTION,
    answer: str = NIAH_ANSWER,
    haystack: str | Haystack = "prose",
    answer_prefix: str = "Answer:",
    fmt: PromptFormat | None = None,
) -> Sample:
    """Needle in a haystack: one ``needle`` sentence at ``depth`` in ``haystack``; ``answer`` is the reference."""
    return compose(
        tokenizer,
        length,
        head=NIAH_INTRO,
        question=question,
        answer_prefix=answer_prefix,
        answer=answer,
        needles=[(depth, needle)],
        haystack=haystack,
        rng=rng,
        metadata={"task": "niah", "depth": depth},
        fmt=fmt,
    )


def multi_niah_sample(
    tokenizer,
    length: int,
    depths: Sequence[float],
    rng: np.random.Generator | int | None = None,
    haystack: str | Haystack = "prose",
    fmt: PromptFormat | None = None,
) -> Sample:
    """Several needles ("The secret number of the {color} door is {n}.") at ``depths``; recall them all.

    References are every needle's number; the answer lists them in needle order.
    """
    rng = as_rng(rng)
    colors = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden"]
    if len(depths) > len(colors):
        raise ValueError(f"at most {len(colors)} needles: got {len(depths)} depths.")
    picked = [colors[i] for i in rng.permutation(len(colors))[: len(depths)]]
    numbers = [str(int(x)) for x in rng.integers(1000, 10000, size=len(depths))]
    needles = [
        (d, f"The secret number of the {c} door is {n}.") for d, c, n in zip(depths, picked, numbers, strict=True)
    ]
    question = f"What are the secret numbers of the {', '.join(picked)} doors?"
    return compose(
        tokenizer,
        length,
        head=NIAH_INTRO,
        question=question,
        answer_prefix="The secret numbers are",
        answer=", ".join(numbers),
        needles=needles,
        haystack=haystack,
        rng=rng,
        references=numbers,
        metadata={"task": "multi_niah", "depth": list(depths)},
        fmt=fmt,
    )
