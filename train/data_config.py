"""Data configuration: which sources to mix, how to tokenize, how to pack — validated up front.

`DataConfig.from_dict` (the one config library, `model.schema`) is what YAML configs go through:
an unknown field, a bad value or a data file that does not exist fails here, before anything is
loaded or compiled, with one sentence naming the field (``data.sources[1].path``) and the fix.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from model import schema
from model.schema import Items
from text.synthetic import PASSKEY_TEMPLATES
from train.packing import PACKING_MODES

SOURCE_KINDS = ("files", "hub", "synthetic")
SYNTHETIC_TASKS = ("passkey", "niah", "multi_needle", "prose")
# File extension → `datasets` builder name.
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
TEXT_SAMPLE_BY = ("document", "paragraph", "line")
BUILTIN_HAYSTACKS = ("prose", "classic", "noise")  # `text.load_haystack` names
# Which split a document key belongs to (part of every source's deterministic document key).
SPLIT_TAGS = {"train": 0, "heldout": 1}


class DataError(ValueError):
    """Bad data configuration or data; the message names the problem and the fix."""


@dataclass(frozen=True)
class SourceConfig:
    """One source in the mixture."""

    kind: str = "synthetic"
    """files (local json/jsonl/parquet/txt), hub (a Hugging Face dataset name, needs network) or synthetic
    (generated retrieval / prose documents)"""
    path: str = ""
    """files: a file, a glob (data/*.jsonl) or a directory; hub: the dataset name"""
    name: str | None = None
    """hub dataset configuration (subset), if any"""
    text_field: str = "text"
    """the column holding each document's text (json/jsonl/parquet; txt files use text)"""
    split: str = "train"
    """hub split (and the split name passed to datasets for files)"""
    weight: float = 1.0
    """share of tokens drawn from this source (weights are normalised over sources)"""
    streaming: bool = False
    """read lazily with datasets streaming (for corpora too large to load); documents come in file order,
    pass after pass"""
    text_sample_by: str = "document"
    """txt files: one document per document (file), paragraph or line"""
    task: str = "passkey"
    """synthetic: passkey, niah, multi_needle or prose (plain haystack text)"""
    haystack: str | None = None
    """synthetic: the haystack for text.load_haystack (prose, classic, a text file); null = the task's
    default (passkey: classic filler, others: prose)"""
    min_length: int | None = None
    """synthetic: shortest document in tokens, drawn uniformly; null = seq_len // 4 (raised to the task's
    minimum when that is larger)"""
    max_length: int | None = None
    """synthetic: longest document in tokens; null = seq_len"""
    needles: int = 4
    """synthetic multi_needle: needles per document"""
    template: str = "classic"
    """synthetic passkey: classic or short (no instruction head; text.synthetic.PASSKEY_TEMPLATES)"""
    # A tiny model sees ~6 answer tokens per 1K-token passkey document; weighting them 10x
    # makes retrieval ~5% of the loss instead of ~0.5%, while the haystack still teaches copying.
    answer_weight: float = 10.0
    """synthetic: loss weight of the answer tokens (the retrieval signal)"""
    context_weight: float = 1.0
    """synthetic: loss weight of every other token (haystack language modelling)"""

    def validate(self, where: str) -> None:
        """Raise `DataError` naming ``where`` (e.g. ``data.sources[0]``) for any bad value."""
        if self.kind not in SOURCE_KINDS:
            raise DataError(f"{where}.kind is {self.kind!r}: use one of {', '.join(SOURCE_KINDS)}.")
        if not self.weight > 0:
            raise DataError(f"{where}.weight is {self.weight}: give a positive mixing weight.")
        if self.kind in ("files", "hub") and not self.path:
            what = "a file, glob or directory" if self.kind == "files" else "a dataset name"
            raise DataError(f"{where}.path is empty: give {what}.")
        if self.kind == "files":
            resolve_files(self.path, where)
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            choices = ", ".join(TEXT_SAMPLE_BY)
            raise DataError(f"{where}.text_sample_by is {self.text_sample_by!r}: use one of {choices}.")
        if self.kind == "synthetic":
            if self.task not in SYNTHETIC_TASKS:
                raise DataError(f"{where}.task is {self.task!r}: use one of {', '.join(SYNTHETIC_TASKS)}.")
            lo, hi = self.min_length, self.max_length
            if (lo is not None and lo < 1) or (hi is not None and hi < 1) or (lo and hi and lo > hi):
                raise DataError(f"{where}: min_length {lo} / max_length {hi} must be positive with min ≤ max.")
            if self.haystack and self.haystack not in BUILTIN_HAYSTACKS and not os.path.isfile(self.haystack):
                raise DataError(
                    f"{where}.haystack {self.haystack!r} is neither {', '.join(BUILTIN_HAYSTACKS)} nor an existing "
                    "text file: fix the path or pick a built-in haystack."
                )
            if self.template not in PASSKEY_TEMPLATES:
                raise DataError(f"{where}.template is {self.template!r}: use one of {', '.join(PASSKEY_TEMPLATES)}.")
            if not 1 <= self.needles <= 10:
                raise DataError(f"{where}.needles is {self.needles}: use 1 to 10 needles.")
            if self.answer_weight < 0 or self.context_weight < 0 or self.answer_weight + self.context_weight == 0:
                raise DataError(f"{where}: answer_weight / context_weight must be ≥ 0 and not both 0.")


@dataclass(frozen=True)
class DataConfig:
    """The data pipeline: a weighted mixture of sources, a tokenizer, packing rules."""

    sources: Items[SourceConfig] = (SourceConfig(),)
    """the mixture (at least one source)"""
    tokenizer: str = "byte"
    """spec for text.tokenizer.load_tokenizer: byte, a directory with tokenizer.json (e.g. the checkpoint's
    own), a tokenizer.json or a tiktoken tokenizer.model path"""
    add_bos: bool = True
    """start every document with BOS"""
    add_eos: bool = True
    """end every document with EOS"""
    packing: str = "fit"
    """fit (a document that fits in a row is never cut) or split (no padding); see train.packing"""
    upsample_long: float = 0.0
    """α ≥ 0; with α > 0 documents of random-access file sources are drawn with probability ∝
    (characters)^α, with replacement, instead of one shuffled pass per epoch (α = 1: every character
    equally likely to be drawn, so long documents come up in proportion to their length). 0 = off. Not
    available for streaming sources."""
    heldout_fraction: float = 0.01
    """share of each file/hub source's documents kept out of training and used by heldout_batches (at
    least one document when a source has two or more); synthetic sources draw held-out documents from a
    disjoint seed stream instead"""
    cache_dir: str | None = None
    """datasets cache directory (null: its default)"""

    def __post_init__(self):
        object.__setattr__(self, "sources", tuple(self.sources))
        self.validate()

    def validate(self, where: str = "data") -> None:
        if not self.sources:
            raise DataError(f"{where}.sources is empty: list at least one source (e.g. kind: synthetic).")
        for i, src in enumerate(self.sources):
            if not isinstance(src, SourceConfig):
                raise DataError(f"{where}.sources[{i}] is a {type(src).__name__}: give a SourceConfig or a mapping.")
            src.validate(f"{where}.sources[{i}]")
            if src.streaming and self.upsample_long > 0:
                raise DataError(
                    f"{where}.upsample_long needs random access but {where}.sources[{i}] is streaming: "
                    "set streaming: false for it or upsample_long: 0."
                )
        if self.packing not in PACKING_MODES:
            raise DataError(f"{where}.packing is {self.packing!r}: use one of {', '.join(PACKING_MODES)}.")
        if self.upsample_long < 0:
            raise DataError(f"{where}.upsample_long is {self.upsample_long}: use 0 (off) or a positive exponent.")
        if not 0 <= self.heldout_fraction < 1:
            raise DataError(f"{where}.heldout_fraction is {self.heldout_fraction}: use a fraction in [0, 1).")

    @classmethod
    def from_dict(cls, d: dict | None) -> DataConfig:
        """Build from a plain mapping (YAML); unknown fields and bad values raise `DataError`."""
        return schema.build(cls, dict(d or {}), "data", label="", error=DataError, brackets=True)

    def to_dict(self) -> dict:
        """A plain, JSON/YAML-serialisable mapping (`from_dict` round-trips it)."""
        return schema.to_dict(self)


def resolve_files(path: str, where: str = "data.sources[0]") -> tuple[str, list[str]]:
    """The ``datasets`` builder and the sorted data files for a file, glob or directory.

    Raises:
        DataError: nothing matches, a file has an unsupported extension, or formats are mixed.
    """
    exts = ", ".join(FILE_FORMATS)
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(
            p
            for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
            if os.path.isfile(p) and os.path.splitext(p)[1].lower() in FILE_FORMATS
        )
        if not files:
            raise DataError(f"data directory {path} ({where}.path) holds no {exts} files: add some or fix the path.")
    elif any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no data file matches {path} ({where}.path): fix the pattern or create the files.")
    else:
        if not os.path.isfile(path):
            raise DataError(
                f"data file {path} does not exist ({where}.path): fix the path (relative paths start at "
                f"{os.getcwd()}) or create the file."
            )
        files = [path]
    builders = set()
    for p in files:
        ext = os.path.splitext(p)[1].lower()
        if ext not in FILE_FORMATS:
            raise DataError(f"data file {p} ({where}.path) has an unsupported extension: use one of {exts}.")
        builders.add(FILE_FORMATS[ext])
    if len(builders) > 1:
        raise DataError(
            f"{where}.path {path} mixes formats ({', '.join(sorted(builders))}): make one source per format."
        )
    return builders.pop(), files
