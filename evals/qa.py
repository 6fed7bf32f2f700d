"""QA over long contexts (RULER's qa_1 / qa_2) from a user-supplied SQuAD- or HotpotQA-format file.

The gold paragraph(s) of one question are hidden at random depths among distractor
paragraphs drawn from the whole file, up to the requested length. Scored with
`evals.scoring.string_match_part` (any reference answer found counts).

Accepted files: SQuAD v1/v2 JSON (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``;
unanswerable questions are skipped) and HotpotQA JSON (a list of ``{"question", "answer",
"context": [[title, [sentences]]], "supporting_facts": [[title, i]]}``) or JSON lines.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

from text.haystack import Haystack, HaystackError, read_json
from text.synthetic import PromptFormat, as_rng, compose

_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)


@dataclass(frozen=True)
class QAItem:
    question: str
    answers: tuple[str, ...]
    gold: tuple[str, ...]  # the paragraphs that hold the answer


@dataclass(frozen=True)
class QADataset:
    name: str
    items: tuple[QAItem, ...]
    pool: Haystack  # every paragraph of the file: the distractors


def _doc(title: str, text: str) -> str:
    text = " ".join(text.split())
    return f"Document: {title}. {text}" if title else f"Document: {text}"


def _squad(data: dict) -> tuple[list[QAItem], list[str]]:
    items, docs = [], []
    for article in data["data"]:
        for para in article["paragraphs"]:
            doc = _doc(article.get("title", "").replace("_", " "), para["context"])
            docs.append(doc)
            for qa in para["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa.get("answers", []) if a["text"].strip()))
                if answers and not qa.get("is_impossible", False):
                    items.append(QAItem(qa["question"], answers, (doc,)))
    return items, docs


def _hotpot(entries: list) -> tuple[list[QAItem], list[str]]:
    items, docs = [], []
    for e in entries:
        paras = {title: _doc(title, "".join(sents)) for title, sents in e["context"]}
        docs.extend(paras.values())
        gold_titles = dict.fromkeys(t for t, _ in e.get("supporting_facts", []))
        gold = tuple(paras[t] for t in gold_titles if t in paras) or tuple(paras.values())
        if str(e["answer"]).strip():
            items.append(QAItem(e["question"], (str(e["answer"]),), gold))
    return items, docs


@functools.lru_cache(maxsize=4)
def load_qa(path: str) -> QADataset:
    """Read a SQuAD or HotpotQA file; raises `HaystackError` with a clear sentence when it cannot."""
    try:
        data = read_json(path)
        if isinstance(data, dict) and "data" in data:
            items, docs = _squad(data)
        elif isinstance(data, list):
            items, docs = _hotpot(data)
        else:
            raise KeyError("data")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HaystackError(
            f"cannot read QA file {path} ({exc.__class__.__name__}: {exc}): give a SQuAD or HotpotQA JSON file."
        ) from exc
    if not items:
        raise HaystackError(f"QA file {path} holds no answerable questions: give a SQuAD or HotpotQA JSON file.")
    pool = Haystack(f"qa:{os.path.basename(path)}", tuple(dict.fromkeys(docs)), random_start=True)
    return QADataset(os.path.basename(path), tuple(items), pool)


def qa_sample(tokenizer, length: int, rng, path: str, fmt: PromptFormat | None = None, depth: float | None = None):
    """One QA prompt of ``length`` tokens: a random question, its gold paragraph(s) among distractors."""
    rng = as_rng(rng)
    data = load_qa(os.path.abspath(path))
    item = data.items[int(rng.integers(len(data.items)))]
    depths = rng.uniform(0, 1, size=len(item.gold)).tolist()
    if depth is not None:
        depths[0] = float(depth)
    return compose(
        tokenizer,
        length,
        head=_INSTRUCTION + "\n\nThe following are given documents.",
        question=f"{_INSTRUCTION}\n\nQuestion: {item.question}",
        answer_prefix="Answer:",
        answer=item.answers[0],
        needles=list(zip(depths, item.gold, strict=True)),
        haystack=data.pool,
        rng=rng,
        references=item.answers,
        metadata={"task": "qa", "depth": depths[0], "qa_file": data.name},
        fmt=fmt,
    )
