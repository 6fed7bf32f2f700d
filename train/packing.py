"""Packing documents into fixed-length rows with segment ids and per-document positions.

A packed row holds several documents back to back. Every token carries the number of its
document inside the row (``segment_ids``, 1, 2, … ; 0 is padding) and its position *inside
its document* (``positions``), so attention masks built from (position, segment) pairs
(`attention.make_mask`) never let one document see another, and RoPE sees each document
start at 0.

A document longer than the space left is not truncated: it fills the row and continues in
the next row, where its positions carry on from where they stopped (the row starts with the
document's token ``offset`` at position ``offset``) and it is that row's segment 1. Nothing
is dropped: every token of every document lands in exactly one row slot.

Targets are next tokens *within the document*: the last token of a document has no target
(loss weight 0), while a token at the end of a row whose document continues in the next row
does have one (the document's next token, which that row cannot see). ``loss_mask`` is a
float32 weight, 0 on padding and on tokens without a target, otherwise the weight the
document assigns to predicting that target (1 unless a source weights, e.g., answer tokens).

Packing modes:
- ``"split"``: fill every slot; a document that does not fit in the remaining space is cut
  there and continues in the next row. No padding at all while documents keep coming.
- ``"fit"`` (default): a document that would fit in a whole row but not in the space left
  starts a fresh row instead (the rest of the current row is padding), so short documents
  such as retrieval samples are never cut in two. Longer-than-a-row documents still start in
  the space left and continue across rows.

Shape letters (the legend in `attention`): b rows of the batch, t positions in a row (also a document's own tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

PACKING_MODES = ("fit", "split")
# Every batch is a dict of these [rows, seq_len] arrays.
BATCH_FIELDS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


class Doc(NamedTuple):
    """One tokenized document.

    Attributes:
        ids: int32 ``[t]`` token ids (BOS/EOS included when the source adds them).
        weights: float32 ``[t]`` loss weight of *predicting* ``ids[i]`` (``weights[0]`` is unused:
            the first token is never a target); None means weight 1 everywhere.
    """

    ids: np.ndarray
    weights: np.ndarray | None = None


def as_doc(doc) -> Doc:
    """A `Doc` from a `Doc`, a ``(ids, weights)`` pair or a plain sequence of ids."""
    if isinstance(doc, Doc):
        return doc
    if isinstance(doc, tuple) and len(doc) == 2 and not np.isscalar(doc[0]):
        ids, weights = doc
        return Doc(np.asarray(ids, np.int32), None if weights is None else np.asarray(weights, np.float32))
    return Doc(np.asarray(doc, np.int32))


def empty_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """All-padding arrays ``[rows, seq_len]``: pad token 0, segment 0, weight 0, positions = column index.

    Padding positions count up with the column so that, inside every row, positions never
    decrease within a segment: a padding query still sees at least itself (no empty softmax
    row) and index-order reasoning (ring hop skipping) holds for padding too.
    """
    out = {name: np.zeros((rows, seq_len), np.int32) for name in BATCH_FIELDS if name != "loss_mask"}
    out["positions"][:] = np.arange(seq_len, dtype=np.int32)
    out["loss_mask"] = np.zeros((rows, seq_len), np.float32)
    return out


class Cursor:
    """The document being packed and how many of its tokens are already placed.

    ``next_doc`` returns the next document (or None when a finite stream is exhausted). The
    cursor pulls lazily: after a document is used up it does not fetch the next one until a
    row needs it, so a saved state never points past what was emitted.
    """

    def __init__(self, next_doc: Callable[[], Doc | None]):
        self._next_doc = next_doc
        self.doc: Doc | None = None
        self.offset = 0
        self.exhausted = False

    def current(self) -> Doc | None:
        """The document to continue (fetching the next one if needed), or None at the end."""
        while self.doc is None and not self.exhausted:
            doc = self._next_doc()
            if doc is None:
                self.exhausted = True
            elif len(doc.ids):  # empty documents carry no tokens: skip them
                self.doc, self.offset = doc, 0
        return self.doc

    def advance(self, n: int) -> None:
        self.offset += n
        if self.offset >= len(self.doc.ids):
            self.doc, self.offset = None, 0


def fill_row(out: dict[str, np.ndarray], r: int, cursor: Cursor, mode: str = "fit") -> int:
    """Pack documents from ``cursor`` into row ``r`` of ``out`` (arrays from `empty_rows`).

    Returns:
        The number of non-padding tokens written (0 once the stream is exhausted).
    """
    seq_len = out["tokens"].shape[1]
    t, seg = 0, 0
    while t < seq_len:
        doc = cursor.current()
        if doc is None:
            break
        n, off = len(doc.ids), cursor.offset
        left, space = n - off, seq_len - t
        if mode == "fit" and off == 0 and t > 0 and space < left <= seq_len:
            break  # it fits in a fresh row: pad this one rather than cut the document
        take = min(left, space)
        seg += 1
        out["tokens"][r, t : t + take] = doc.ids[off : off + take]
        out["positions"][r, t : t + take] = np.arange(off, off + take, dtype=np.int32)
        out["segment_ids"][r, t : t + take] = seg
        # Tokens off..off+take-1 predict off+1..off+take; the document's last token predicts nothing.
        n_tgt = min(take, n - 1 - off)
        if n_tgt > 0:
            out["targets"][r, t : t + n_tgt] = doc.ids[off + 1 : off + 1 + n_tgt]
            w = 1.0 if doc.weights is None else doc.weights[off + 1 : off + 1 + n_tgt]
            out["loss_mask"][r, t : t + n_tgt] = w
        t += take
        cursor.advance(take)
    return t


def pack_documents(docs: Iterable, seq_len: int, mode: str = "fit", rows: int | None = None) -> dict[str, np.ndarray]:
    """Pack a finite list of documents into ``[b, seq_len]`` arrays (the last row padded).

    Args:
        docs: documents as `Doc`, ``(ids, weights)`` or id sequences.
        seq_len: row length ``t``.
        mode: ``"fit"`` or ``"split"`` (module docstring).
        rows: pack exactly this many rows (documents left over are not packed); default: as
            many rows as it takes to place every token.

    Returns:
        ``tokens``, ``targets``, ``positions``, ``segment_ids`` (int32) and ``loss_mask``
        (float32), each ``[b, t]``.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"unknown packing mode {mode!r}: use one of {', '.join(PACKING_MODES)}.")
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}.")
    it = iter(docs)
    cursor = Cursor(lambda: next((as_doc(d) for d in it), None))
    if rows is not None:
        out = empty_rows(rows, seq_len)
        for r in range(rows):
            fill_row(out, r, cursor, mode)
        return out
    blocks = []
    while cursor.current() is not None:
        block = empty_rows(1, seq_len)
        fill_row(block, 0, cursor, mode)
        blocks.append(block)
    if not blocks:
        return empty_rows(0, seq_len)
    return {name: np.concatenate([b[name] for b in blocks]) for name in BATCH_FIELDS}


def unpack_documents(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Reassemble the documents of contiguous-layout rows given in stream order (for tests and debugging).

    The inverse of packing, PoSE rows (`train.pose`) included. A document that goes on past its
    row is the next row's segment 1, and packing says so twice: the continuation's positions
    carry on from where the row stopped, and the row's last token keeps a target (the
    document's next token; a document's own last token has none). PoSE re-bases every piece to
    position 0, which leaves the target: the piece continues when the previous row's last token
    has a target (a non-zero id or weight) and that target is the piece's first token.

    Raises:
        ValueError: a row starting at position 0 with token id 0 after a row whose last token's
            target is id 0 with weight 0 — a finished document and a PoSE continuation look the same.
    """
    docs: list[list[int]] = []
    last = None  # (document, its row-final token has a target, that target id) when the previous row ends in one
    rows = zip(*(batch[k] for k in ("tokens", "positions", "segment_ids", "targets", "loss_mask")), strict=True)
    for r, (tok, pos, seg, tgt, weight) in enumerate(rows):
        for s in np.unique(seg[seg > 0]):
            where = seg == s
            ids, first_pos = tok[where].tolist(), int(pos[where][0])
            if where[0] and last is not None and _continues(r, *last, ids[0], first_pos):
                last[0].extend(ids)
            else:
                docs.append(ids)
        last = (docs[-1], bool(weight[-1] > 0 or tgt[-1] != 0), int(tgt[-1])) if seg[-1] > 0 else None
    return [np.asarray(d, np.int32) for d in docs]


def _continues(r: int, doc: list[int], has_target: bool, target: int, first_id: int, first_pos: int) -> bool:
    """Whether row ``r``'s first piece (token ``first_id`` at ``first_pos``) continues ``doc`` from row ``r − 1``."""
    if first_pos:  # plain rows: a continuation's positions carry on, a new document's start at 0
        return first_pos == len(doc)
    if has_target:  # positions restart (PoSE): the previous row's last target names the next token
        return target == first_id
    if first_id == 0:
        raise ValueError(
            f"unpack_documents cannot tell whether row {r} continues the document row {r - 1} ends in: the row "
            "restarts at position 0 (as PoSE rows do) with token id 0, and a last target of id 0 with weight 0 "
            "also marks a finished document."
        )
    return False
