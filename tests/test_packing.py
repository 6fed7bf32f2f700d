"""Packing: no cross-document attention, per-document positions, no tokens lost, long documents continue
(and unpack back, PoSE rows included).

Documents are built so that every token names itself: token = 1000·(doc + 1) + index in the
document. From a packed slot alone we can then tell which document and which position it
must hold, and check masks and targets against that ground truth.
"""

import numpy as np
import pytest

from attention import make_mask
from train.packing import Doc, pack_documents, unpack_documents
from train.pose import apply_pose, chunk_positions, draw_chunks, pose_rng

SEQ = 32


def _docs(lengths):
    return [np.arange(n, dtype=np.int32) + 1000 * (i + 1) for i, n in enumerate(lengths)]


# Short, exactly-one-row, longer-than-a-row (2.5 rows) and single-token documents, in an order
# that forces both the "fit" break and continuation across rows.
LENGTHS = [5, 20, 17, 1, SEQ, 80, 3, 31, 9, 2 * SEQ + 7, 12]


def _doc_and_index(tokens):
    return tokens // 1000 - 1, tokens % 1000


@pytest.mark.parametrize("mode", ["fit", "split"])
def test_no_cross_document_attention_and_positions_reset(mode):
    batch = pack_documents(_docs(LENGTHS), SEQ, mode=mode)
    seg, pos, tok = batch["segment_ids"], batch["positions"], batch["tokens"]
    real = seg > 0
    doc, index = _doc_and_index(tok)
    # Positions are the index inside the document: 0 at every document start, continuing across rows.
    np.testing.assert_array_equal(pos[real], index[real])
    mask = np.asarray(make_mask(pos, pos, seg, seg, causal=True))  # [r, t, s]
    same_doc = (doc[:, :, None] == doc[:, None, :]) & real[:, :, None] & real[:, None, :]
    earlier = index[:, :, None] >= index[:, None, :]
    # A real query sees exactly the earlier-or-same tokens of its own document that are in its row.
    np.testing.assert_array_equal(mask & real[:, :, None], same_doc & earlier)
    # Every padding query still sees something (no empty softmax row) and no real token.
    pad_q = ~real
    assert np.all(mask.sum(-1)[pad_q] >= 1)
    assert not np.any(mask[pad_q[:, :, None] & real[:, None, :].repeat(SEQ, 1)])


@pytest.mark.parametrize("mode", ["fit", "split"])
def test_no_tokens_lost_and_targets_are_next_tokens(mode):
    docs = _docs(LENGTHS)
    batch = pack_documents(docs, SEQ, mode=mode)
    back = unpack_documents(batch)
    assert len(back) == len(docs)
    for a, b in zip(back, docs, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (batch["segment_ids"] > 0).sum() == sum(LENGTHS)
    # Targets: the next token of the same document, weight 1; 0 on padding and document ends.
    tok, tgt, lm = batch["tokens"], batch["targets"], batch["loss_mask"]
    real = batch["segment_ids"] > 0
    doc, index = _doc_and_index(tok)
    has_next = real & (index + 1 < np.asarray(LENGTHS)[np.clip(doc, 0, None)])
    np.testing.assert_array_equal(lm, has_next.astype(np.float32))
    np.testing.assert_array_equal(tgt[has_next], tok[has_next] + 1)
    assert lm.sum() == sum(n - 1 for n in LENGTHS)  # every in-document next-token pair is trained exactly once


def test_long_document_continues_across_rows_with_one_segment_per_row():
    batch = pack_documents(_docs([10, 3 * SEQ - 4, 6]), SEQ, mode="split")
    doc, index = _doc_and_index(batch["tokens"])
    rows_with_long = [r for r in range(len(doc)) if np.any(doc[r] == 1)]
    assert rows_with_long == [0, 1, 2, 3]
    for r in rows_with_long:
        where = doc[r] == 1
        assert len(np.unique(batch["segment_ids"][r][where])) == 1  # one segment id inside each row
        assert np.all(np.diff(batch["positions"][r][where]) == 1)
    # Row 1 starts mid-document at the position where row 0 stopped (no truncation, no restart).
    assert batch["positions"][1, 0] == SEQ - 10 and batch["segment_ids"][1, 0] == 1
    # The last token of row 0 still has the document's next token (in row 1) as its target.
    assert batch["loss_mask"][0, -1] == 1 and batch["targets"][0, -1] == batch["tokens"][1, 0]


def test_fit_never_cuts_a_document_that_fits_a_row_and_split_never_pads():
    docs = _docs(LENGTHS)
    fit = pack_documents(docs, SEQ, mode="fit")
    for i, n in enumerate(LENGTHS):
        rows = {r for r in range(len(fit["tokens"])) if np.any(_doc_and_index(fit["tokens"][r])[0] == i)}
        assert len(rows) == (1 if n <= SEQ else len(rows)), (i, n, rows)
    split = pack_documents(docs, SEQ, mode="split")
    assert np.all(split["segment_ids"][:-1] > 0)  # only the final row may hold padding
    assert len(split["tokens"]) == -(-sum(LENGTHS) // SEQ)


def test_document_weights_become_loss_weights():
    w = np.array([9.0, 1.0, 2.0, 3.0], np.float32)  # weight of predicting token i (w[0] unused)
    batch = pack_documents([Doc(np.array([7, 8, 9, 10], np.int32), w), [5, 6]], 8, mode="split")
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 2, 3, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["targets"][0][:5], [8, 9, 10, 0, 6])
    assert np.all(batch["positions"][0] == [0, 1, 2, 3, 0, 1, 6, 7])  # padding positions count with the column


def test_fixed_row_count_and_bad_mode():
    batch = pack_documents(_docs([40, 40]), SEQ, mode="split", rows=2)
    assert batch["tokens"].shape == (2, SEQ) and np.all(batch["segment_ids"] > 0)
    with pytest.raises(ValueError, match="unknown packing mode 'greedy'"):
        pack_documents([[1, 2]], SEQ, mode="greedy")


@pytest.mark.parametrize("mode", ["fit", "split"])
def test_unpack_rejoins_documents_across_pose_rows(mode):
    """PoSE re-bases every piece to position 0; the rows' targets still rejoin each continued document.

    Weights 0 on every continuation's first prediction: the target id alone must carry the link.
    """
    docs = _docs(LENGTHS)
    plain = pack_documents(docs, SEQ, mode=mode)
    continued = (plain["segment_ids"][1:, 0] == 1) & (plain["positions"][1:, 0] > 0)  # rows 1.. that continue
    weights = [np.ones(len(d), np.float32) for d in docs]
    for doc, offset in zip(*_doc_and_index(plain["tokens"][1:, 0][continued]), strict=True):
        weights[doc][offset] = 0.0
    batch = pack_documents([Doc(d, w) for d, w in zip(docs, weights, strict=True)], SEQ, mode=mode)
    ends = np.flatnonzero(continued)  # row-final tokens that predict a continuation: weight 0, target kept
    assert len(ends) >= 3 and (batch["loss_mask"][ends, -1] == 0).all() and (batch["targets"][ends, -1] > 0).all()
    starts, skips = draw_chunks(pose_rng(11, 0), len(batch["tokens"]), SEQ, 4 * SEQ, 3)
    pose = apply_pose(batch, chunk_positions(starts, skips, SEQ))
    assert (pose["positions"][1:, 0][continued] == 0).all()  # the positions no longer say "continued"
    for a, b in zip(unpack_documents(pose), docs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unpack_refuses_a_pose_row_it_cannot_read():
    """Token id 0 continuing a document after a weight-0 target: in a PoSE row this equals a document end."""
    first = np.arange(SEQ + 4, dtype=np.int32) + 1000
    first[SEQ] = 0  # row 1 starts with token 0 ...
    weights = np.ones(SEQ + 4, np.float32)
    weights[SEQ] = 0.0  # ... whose prediction from row 0's last token has weight 0
    batch = pack_documents([Doc(first, weights), _docs([6])[0]], SEQ, mode="split")
    assert batch["targets"][0, -1] == 0 and batch["loss_mask"][0, -1] == 0
    np.testing.assert_array_equal(unpack_documents(batch)[0], first)  # plain rows: the positions decide
    rebased = apply_pose(batch, np.tile(np.arange(SEQ, dtype=np.int32), (len(batch["tokens"]), 1)))
    assert rebased["positions"][1, 0] == 0
    with pytest.raises(ValueError, match="cannot tell whether row 1 continues the document row 0 ends in"):
        unpack_documents(rebased)
