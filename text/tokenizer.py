"""Tokenizers behind one small interface: byte-level (built in), HF ``tokenizer.json``, Llama 3 tiktoken.

`load_tokenizer(spec)` takes ``"byte"``, a directory holding ``tokenizer.json`` (e.g. the
checkpoint's own), a ``tokenizer.json`` path, or Meta's ``tokenizer.model`` (tiktoken ranks).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from typing import Protocol


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message says what to provide."""


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as ids 0–255; control bytes 0/1/2 double as pad/bos/eos (they never occur in prose)."""

    vocab_size: int = 256
    bos_id: int | None = 1
    eos_id: int | None = 2
    pad_id: int = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids if int(i) > 2).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face fast tokenizer read from ``tokenizer.json`` (no hub access)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _Tok

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = _Tok.from_file(file)
        except Exception as exc:  # the tokenizers library raises its own exception type
            raise TokenizerError(f"cannot read tokenizer {file}: {exc}; give a valid tokenizer.json.") from exc
        meta = {}
        for name in ("tokenizer_config.json", "config.json"):
            p = os.path.join(directory, name)
            if os.path.isfile(p):
                with open(p) as fh:
                    meta = {**json.load(fh), **meta}
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id = self._token_id(meta.get("bos_token")) if "bos_token" in meta else meta.get("bos_token_id")
        self.eos_id = self._token_id(meta.get("eos_token")) if "eos_token" in meta else meta.get("eos_token_id")
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]
        pad = self._token_id(meta.get("pad_token")) if meta.get("pad_token") else meta.get("pad_token_id")
        if pad is None:
            pad = self.eos_id if self.eos_id is not None else 0
        self.pad_id = int(pad)

    def _token_id(self, token) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


# Llama 3's pre-tokenisation pattern and special tokens (from Meta's released tokenizer).
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


def read_bpe_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken ranks file: one ``<base64 token> <rank>`` per line.

    Read directly rather than through ``tiktoken.load.load_tiktoken_bpe``, whose cache is keyed
    by the path string and would serve stale ranks after the file at that path changes.
    """
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise TokenizerError(f"cannot read {path} ({exc.strerror}): give a readable tokenizer.model.") from exc
    ranks = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(
                f"{path} line {number} is not '<base64 token> <rank>': give a tiktoken BPE file "
                "(Llama 3's original tokenizer.model), or a tokenizer.json."
            ) from None
    if not ranks:
        raise TokenizerError(f"{path} holds no BPE ranks: give Llama 3's tokenizer.model.")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: BPE ranks must be 0..{len(ranks) - 1} without gaps or repeats.")
    return ranks


class TiktokenTokenizer:
    """Meta's Llama 3 ``tokenizer.model`` (base64 BPE ranks) through the ``tiktoken`` package."""

    def __init__(self, path: str):
        try:
            import tiktoken
        except ImportError as exc:
            raise TokenizerError("reading tokenizer.model needs tiktoken: pip install 'ringllama[tiktoken]'.") from exc
        ranks = read_bpe_ranks(path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(_LLAMA3_SPECIALS)}
        try:
            self._enc = tiktoken.Encoding(
                "llama3", pat_str=_LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
            )
        except Exception as exc:  # tiktoken raises ValueError / its own errors for inconsistent ranks
            raise TokenizerError(f"tiktoken rejected the ranks in {path}: {exc}.") from exc
        self.vocab_size = len(ranks) + len(specials)
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if int(i) < self.bos_id])


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``"byte"`` / None → `ByteTokenizer`; a directory or ``tokenizer.json`` → HF; ``*.model`` → tiktoken."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    if os.path.isdir(spec):
        if os.path.isfile(os.path.join(spec, "tokenizer.json")):
            return HFTokenizer(spec)
        if os.path.isfile(os.path.join(spec, "tokenizer.model")):
            return TiktokenTokenizer(os.path.join(spec, "tokenizer.model"))
        raise TokenizerError(f"{spec} holds neither tokenizer.json nor tokenizer.model: point at a tokenizer file.")
    if not os.path.isfile(spec):
        raise TokenizerError(
            f"tokenizer {spec!r} does not exist: use 'byte', a directory, a tokenizer.json or a tokenizer.model path."
        )
    return TiktokenTokenizer(spec) if spec.endswith(".model") else HFTokenizer(spec)
