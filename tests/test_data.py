"""The data iterator: file formats, determinism, exact resume, mixture shares, host slices, ring layouts, errors."""

import json

import numpy as np
import pytest

from attention.layout import LayoutError, from_layout
from text import PASSKEY_INTRO
from text.tokenizer import ByteTokenizer
from train.data import heldout_batches, make_iterator
from train.data_config import DataConfig, DataError
from train.packing import unpack_documents
from train.sources import FileSource

TEXTS = [f"document {i}: " + " ".join(["word"] * (3 + 7 * i)) + "." for i in range(12)]


def _jsonl(path, texts, field="text"):
    with open(path, "w") as fh:
        for t in texts:
            fh.write(json.dumps({field: t, "id": len(t)}) + "\n")
    return str(path)


def _cfg(path, **kw):
    src = {"kind": "files", "path": str(path), **kw.pop("src", {})}
    return DataConfig.from_dict({"sources": [src], "heldout_fraction": 0.0, **kw})


def _decoded_docs(batches):
    """Decode documents back from contiguous batches (BOS/EOS stripped by the byte tokenizer's decode)."""
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return [ByteTokenizer().decode(d) for d in unpack_documents(rows)]


def _write(fmt, tmp_path, texts):
    if fmt == "jsonl":
        return _jsonl(tmp_path / "d.jsonl", texts)
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"text": t} for t in texts]))
        return str(tmp_path / "d.json")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    for i, t in enumerate(texts):  # txt: a directory of files, one document each
        (tmp_path / f"{i:02d}.txt").write_text(t)
    return str(tmp_path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_each_file_format_loads_every_document(fmt, tmp_path):
    path = _write(fmt, tmp_path, TEXTS)
    it = make_iterator(_cfg(path, src={"weight": 1.0}), 64, 4, seed=0)
    n_tokens = sum(len(t) + 2 for t in TEXTS)  # + BOS and EOS
    batches = [next(it) for _ in range(-(-n_tokens // (64 * 4)) + 3)]
    docs = _decoded_docs(batches)
    # One epoch is a permutation of the documents; every text comes back whole.
    assert sorted(docs[: len(TEXTS)]) == sorted(TEXTS)


def test_determinism_and_exact_resume_mid_document(tmp_path):
    cfg = DataConfig.from_dict(
        {
            "sources": [
                {"kind": "files", "path": _jsonl(tmp_path / "a.jsonl", TEXTS), "weight": 1.0},
                {"kind": "synthetic", "task": "passkey", "weight": 2.0, "min_length": 260, "max_length": 400},
            ],
            "packing": "split",
        }
    )
    a = make_iterator(cfg, 128, 2, seed=3)
    b = make_iterator(cfg, 128, 2, seed=3)
    first = [next(a) for _ in range(5)]
    for x in first:
        y = next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other = next(make_iterator(cfg, 128, 2, seed=4))
    assert not np.array_equal(other["tokens"], first[0]["tokens"])

    saved = json.loads(json.dumps(a.state()))  # JSON round trip, as a checkpoint stores it
    assert saved["offset"] > 0  # documents of 260+ tokens in 128-token rows: saved mid-document
    expected = [next(a) for _ in range(4)]
    resumed = make_iterator(cfg, 128, 2, seed=3)
    resumed.restore(saved)
    for x in expected:
        y = next(resumed)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # Prefetching in a thread gives the same batches, and its state is that of the last batch *returned*.
    pre = make_iterator(cfg, 128, 2, seed=3, prefetch=3)
    for x in first:
        assert np.array_equal(next(pre)["tokens"], x["tokens"])
    assert pre.state() == saved and pre.seq_len == 128
    pre.close()  # rewinds to the last batch returned
    assert np.array_equal(next(pre)["tokens"], expected[0]["tokens"])
    pre.restore(saved)
    assert np.array_equal(next(pre)["tokens"], expected[0]["tokens"])
    pre.close()
    with pytest.raises(DataError, match="saved for seed 3"):
        make_iterator(cfg, 128, 2, seed=5).restore(saved)


def test_mixture_token_shares_follow_weights(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["a" * (20 + 13 * i) for i in range(10)])
    b = _jsonl(tmp_path / "b.jsonl", ["b" * (50 + 31 * i) for i in range(10)])
    cfg = DataConfig.from_dict(
        {
            "sources": [{"kind": "files", "path": a, "weight": 3.0}, {"kind": "files", "path": b, "weight": 1.0}],
            "heldout_fraction": 0.0,
            "add_bos": False,
            "add_eos": False,
            "packing": "split",
        }
    )
    it = make_iterator(cfg, 256, 4, seed=0)
    tokens = np.concatenate([next(it)["tokens"].ravel() for _ in range(6)])
    share_a = np.sum(tokens == ord("a")) / np.sum((tokens == ord("a")) | (tokens == ord("b")))
    assert abs(share_a - 0.75) < 0.03, share_a


def test_process_slices_partition_the_global_batch_and_layouts_round_trip():
    cfg = DataConfig.from_dict({"sources": [{"kind": "synthetic", "task": "prose", "min_length": 40}]})
    full = next(make_iterator(cfg, 64, 4, seed=1))
    for count in (2, 4):
        parts = [next(make_iterator(cfg, 64, 4, seed=1, process_index=p, process_count=count)) for p in range(count)]
        for k in full:
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
    for layout in ("zigzag", "striped"):
        permuted = next(
            make_iterator(cfg, 64, 4, seed=1, layout=layout, num_shards=4, process_index=1, process_count=2)
        )
        assert not np.array_equal(permuted["positions"], full["positions"][2:])
        for k in full:
            np.testing.assert_array_equal(from_layout(permuted[k], 4, layout), full[k][2:])
    with pytest.raises(LayoutError, match="multiple of 8"):
        make_iterator(cfg, 60, 4, seed=1, layout="zigzag", num_shards=4)
    with pytest.raises(DataError, match="does not split over 3 processes"):
        make_iterator(cfg, 64, 4, seed=1, process_count=3)


def test_synthetic_passkey_documents_come_from_the_eval_generator():
    cfg = DataConfig.from_dict({"sources": [{"kind": "synthetic", "task": "passkey", "answer_weight": 7.0}]})
    batch = next(make_iterator(cfg, 512, 2, seed=0))
    tok = ByteTokenizer()
    text = tok.decode(batch["tokens"][0][batch["segment_ids"][0] == 1])
    assert text.startswith(PASSKEY_INTRO) and "What is the pass key?" in text
    key = text.split("The pass key is ")[1][:5]
    assert key.isdigit() and text.endswith(f"The pass key is {key}")  # prompt, answer, then EOS (not decoded)
    # The answer tokens (" " + 5 digits) carry answer_weight; everything else weight 1 or 0.
    seg1 = batch["segment_ids"][0] == 1
    weights = batch["loss_mask"][0][seg1]
    assert np.sum(weights == 7.0) == 6 and set(np.unique(weights)) <= {0.0, 1.0, 7.0}
    assert batch["positions"][0][seg1].max() < 512  # a document that fits a row is never cut ("fit")
    held = heldout_batches(cfg, 512, 2, 1, seed=0)[0]
    assert set(np.unique(held["loss_mask"])) == {0.0, 1.0}  # perplexity: every token counts once
    assert not np.array_equal(held["tokens"], batch["tokens"])


def test_heldout_documents_never_appear_in_training(tmp_path):
    texts = [f"unique text number {i:03d} " + "x" * 30 for i in range(40)]
    cfg = DataConfig.from_dict(
        {"sources": [{"kind": "files", "path": _jsonl(tmp_path / "d.jsonl", texts)}], "heldout_fraction": 0.1}
    )
    train_docs = set(_decoded_docs([next(make_iterator(cfg, 128, 8, seed=0)) for _ in range(1)]))
    it = make_iterator(cfg, 128, 8, seed=0)
    train_docs |= set(_decoded_docs([next(it) for _ in range(4)]))
    held = set(_decoded_docs(heldout_batches(cfg, 128, 2, 2, seed=0)))
    assert len(held) == 4 and held <= set(texts)
    assert not held & train_docs and len(train_docs) == 36
    again = heldout_batches(cfg, 128, 2, 2, seed=0)
    assert np.array_equal(again[0]["tokens"], heldout_batches(cfg, 128, 2, 2, seed=0)[0]["tokens"])


def test_length_upsampling_favours_long_documents(tmp_path):
    texts = ["s" * 10] * 9 + ["L" * 1000]
    cfg = _cfg(_write("jsonl", tmp_path, texts), upsample_long=1.0)
    source = FileSource(cfg.sources[0], 0, cfg, ByteTokenizer(), seed=0, split="train", where="data.sources[0]")
    draws = [len(source.get(m).ids) for m in range(400)]
    long_share = np.mean(np.array(draws) > 500)
    assert abs(long_share - 1000 / 1090) < 0.06  # p ∝ characters^1; uniform would give 0.1


def test_streaming_source_resumes_exactly(tmp_path):
    cfg = _cfg(_jsonl(tmp_path / "d.jsonl", TEXTS), src={"streaming": True}, packing="split")
    it = make_iterator(cfg, 48, 2, seed=0)
    [next(it) for _ in range(3)]
    saved = it.state()
    expected = [next(it) for _ in range(8)]  # runs into the second pass over the stream
    resumed = make_iterator(cfg, 48, 2, seed=0)
    resumed.restore(saved)
    for x in expected:
        assert np.array_equal(next(resumed)["tokens"], x["tokens"])
    assert set(_decoded_docs([next(make_iterator(cfg, 512, 8, seed=0))])[: len(TEXTS)]) == set(TEXTS)


def test_bad_inputs_fail_with_clear_messages(tmp_path):
    with pytest.raises(DataError, match=r"unknown field data\.sources\[0\]\.txt_field"):
        DataConfig.from_dict({"sources": [{"kind": "files", "path": "x.jsonl", "txt_field": "body"}]})
    with pytest.raises(DataError, match=r"unknown field data\.shuffle"):
        DataConfig.from_dict({"shuffle": True})
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"data file {missing} does not exist \(data\.sources\[0\]\.path\)"):
        DataConfig.from_dict({"sources": [{"kind": "files", "path": str(missing)}]})
    with pytest.raises(DataError, match="no data file matches"):
        DataConfig.from_dict({"sources": [{"kind": "files", "path": str(tmp_path / "*.parquet")}]})
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported extension"):
        DataConfig.from_dict({"sources": [{"kind": "files", "path": str(tmp_path / "notes.csv")}]})
    with pytest.raises(DataError, match=r"haystack 'missing\.txt' is neither prose, classic, noise"):
        DataConfig.from_dict({"sources": [{"kind": "synthetic", "haystack": "missing.txt"}]})
    with pytest.raises(DataError, match="wrong type"):
        DataConfig.from_dict({"sources": [{"kind": "synthetic", "weight": "high"}]})
    with pytest.raises(DataError, match="task is 'riddle'"):
        DataConfig.from_dict({"sources": [{"kind": "synthetic", "task": "riddle"}]})
    with pytest.raises(DataError, match="streaming"):
        DataConfig.from_dict({"sources": [{"kind": "hub", "path": "x/y", "streaming": True}], "upsample_long": 1.0})

    path = _jsonl(tmp_path / "body.jsonl", TEXTS, field="body")
    with pytest.raises(DataError, match=r"has no field 'text'; its fields are body, id: set data\.sources\[0\]"):
        make_iterator(_cfg(path), 64, 2, seed=0)
    (tmp_path / "empty.parquet").parent.mkdir(exist_ok=True)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="holds no documents"):
        make_iterator(_cfg(tmp_path / "empty.parquet"), 64, 2, seed=0)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match=r"empty\.json \(data\.sources\[0\]\.path\) holds no documents"):
        make_iterator(_cfg(tmp_path / "empty.json"), 64, 2, seed=0)
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(DataError, match=r"cannot read .*broken\.jsonl \(data\.sources\[0\]\) as json \(.*Error"):
        make_iterator(_cfg(tmp_path / "broken.jsonl"), 64, 2, seed=0)
    from text.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="does not exist"):
        make_iterator(_cfg(path, tokenizer=str(tmp_path / "tok.json"), src={"text_field": "body"}), 64, 2, seed=0)
