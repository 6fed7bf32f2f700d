"""Haystacks: the filler text that needles hide in, as plain sentences and as cached token streams.

Built-in haystacks (`load_haystack`):

- ``"prose"`` — English prose from `pydoc_data.topics` (the help text that ships with Python,
  ~465K characters), cleaned into plain sentences: headings, code and grammar blocks dropped.
- ``"noise"`` / ``"classic"`` — the passkey filler "The grass is green. The sky is blue. The sun
  is yellow. Here we go. There and back again." repeated (RULER's "noise" haystack).
- a path to a UTF-8 text file, a JSON(L) file of ``{"text"}`` records or a saved `datasets`
  directory — its documents, split into sentences.

A haystack is tokenized once per tokenizer (each sentence with a leading space, so pieces
concatenate like running text) and then read as an endless, cyclic token stream.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass

import numpy as np

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


class HaystackError(ValueError):
    """A haystack that cannot be read; the message says what to provide."""


@dataclass(frozen=True)
class Haystack:
    """An ordered list of sentences; ``random_start`` samples where each prompt starts reading it."""

    name: str
    sentences: tuple[str, ...]
    random_start: bool = True


def split_sentences(text: str) -> list[str]:
    """Plain sentences from prose: blank-line paragraphs, joined lines, split after ``.``/``?``/``!``."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if para:
            out.extend(s for s in _SENTENCE_END.split(para) if s)
    return out


def _looks_like_prose(text: str) -> bool:
    """A sentence-ending paragraph of mostly letters (code, grammar rules and tables are not)."""
    if len(text.split()) < 6 or not text.endswith(".") or "::=" in text or ">>>" in text:
        return False
    visible = text.replace(" ", "")
    return sum(c.isalpha() for c in visible) > 0.75 * len(visible)


def _clean_topic(text: str) -> list[str]:
    """Prose paragraphs of one pydoc topic: headings, code, grammar blocks and fragments dropped."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if len(lines) >= 2 and _UNDERLINE.match(lines[1].strip()):  # a heading and its underline
            continue
        if len(lines) >= 2 and not lines[0].startswith(" ") and lines[1].startswith(" "):
            lines = lines[1:]  # a definition-list term ("Tuples") followed by its indented body
        joined = " ".join(" ".join(lines).split())
        if _looks_like_prose(joined):
            paragraphs.append(joined)
    return paragraphs


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """English prose from `pydoc_data.topics`, cleaned into plain sentences separated by spaces."""
    from pydoc_data.topics import topics

    paragraphs = [p for key in sorted(topics) for p in _clean_topic(topics[key])]
    return " ".join(paragraphs)


@functools.lru_cache(maxsize=8)
def _builtin(name: str) -> Haystack:
    if name == "prose":
        return Haystack("prose", tuple(split_sentences(haystack_text())), random_start=True)
    return Haystack(name, tuple(split_sentences(FILLER)), random_start=False)


def load_haystack(spec: str | Haystack = "prose") -> Haystack:
    """``"prose"``, ``"noise"``/``"classic"``, a text-file path, or a `Haystack` (returned as is)."""
    if isinstance(spec, Haystack):
        return spec
    if spec in ("prose", "noise", "classic"):
        return _builtin(spec)
    return _from_file(os.path.abspath(spec))


def read_json(path: str):
    """A JSON file's value, or a JSON-lines file as the list of its lines' values.

    Raises OSError, UnicodeDecodeError or json.JSONDecodeError (a ValueError); callers turn them
    into their own one-sentence errors.
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_documents(path: str, what: str = "text data") -> list[str]:
    """Documents from a UTF-8 ``.txt`` file (one document), a ``.json``/``.jsonl`` file of
    ``{"text": ...}`` records, or a directory written by `datasets.Dataset.save_to_disk` (column ``text``).
    """
    try:
        if os.path.isdir(path):
            import datasets

            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
            docs = [str(t) for t in ds["text"]]
        elif path.endswith((".json", ".jsonl")):
            rows = read_json(path)
            docs = [str(r["text"]) for r in (rows if isinstance(rows, list) else [rows])]
        else:
            with open(path, encoding="utf-8") as fh:
                docs = [fh.read()]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise HaystackError(
            f"cannot read {what} {path} ({exc.__class__.__name__}): give a UTF-8 .txt file, a JSON(L) file of "
            "{'text': ...} records or a saved datasets directory."
        ) from exc
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise HaystackError(f"{what} {path} is empty: give a file with text in it.")
    return docs


@functools.lru_cache(maxsize=8)
def _from_file(path: str) -> Haystack:
    docs = read_documents(path, "haystack file")
    sentences = [s for d in docs for s in split_sentences(d)]
    if not sentences:
        raise HaystackError(f"haystack file {path} holds no text: give a file with prose in it.")
    return Haystack(os.path.basename(path), tuple(sentences), random_start=True)


@dataclass(frozen=True)
class TokenStream:
    """One pass of a haystack as tokens; ``starts[i]`` is where sentence ``i`` begins in ``ids``."""

    ids: np.ndarray  # [n] int32
    starts: np.ndarray  # [sentences] int64, starts[0] == 0

    def take(self, first_sentence: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` tokens read cyclically from sentence ``first_sentence``, and the sentence starts inside them.

        Returns:
            ``(ids [n], boundaries)`` where boundaries are offsets in ``[0, n]`` at which a sentence
            begins (always including 0 and n, so a needle may go first or last).
        """
        total = len(self.ids)
        offset = int(self.starts[first_sentence])
        reps = (offset + n) // total + 1
        ids = np.tile(self.ids, reps)[offset : offset + n]
        starts = (self.starts[None, :] + total * np.arange(reps)[:, None]).ravel() - offset
        inner = starts[(starts > 0) & (starts < n)]
        return ids, np.concatenate([[0], inner, [n]]).astype(np.int64)


_STREAMS: dict[tuple[int, Haystack], tuple[object, TokenStream]] = {}


def token_stream(tokenizer, haystack: Haystack) -> TokenStream:
    """The haystack tokenized by ``tokenizer`` (cached per tokenizer object and haystack)."""
    key = (id(tokenizer), haystack)
    hit = _STREAMS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    stream = sentences_to_stream(tokenizer, haystack.sentences)
    if len(_STREAMS) > 16:
        _STREAMS.clear()
    # The tokenizer is kept alive with its entry so id() cannot be reused by another object.
    _STREAMS[key] = (tokenizer, stream)
    return stream


def sentences_to_stream(tokenizer, sentences) -> TokenStream:
    """Tokenize sentences (each with a leading space) into one `TokenStream`."""
    pieces = [tokenizer.encode(" " + s) for s in sentences]
    pieces = [p for p in pieces if p]
    if not pieces:
        raise HaystackError("the haystack tokenizes to nothing: give a haystack with text in it.")
    lengths = np.array([len(p) for p in pieces], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ids = np.fromiter((t for p in pieces for t in p), np.int32, count=int(lengths.sum()))
    return TokenStream(ids, starts)
