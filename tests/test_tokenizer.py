"""Tokenizers: byte-level round trip, a locally built HF tokenizer.json, a tiny tiktoken ranks file, clear errors."""

import base64
import json

import pytest

from text.tokenizer import ByteTokenizer, HFTokenizer, TiktokenTokenizer, TokenizerError, load_tokenizer

TEXT = "Ring attention carries 1,048,576 tokens — ünïcödé too.\nNew line."


def test_byte_tokenizer_round_trip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and tok.decode(ids) == TEXT
    assert {tok.pad_id, tok.bos_id, tok.eos_id} == {0, 1, 2}
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == TEXT  # specials are dropped on decode


def _hf_dir(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator([TEXT, "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    return tmp_path


def test_hf_tokenizer_json_round_trip(tmp_path):
    directory = _hf_dir(tmp_path)
    for spec in (str(directory), str(directory / "tokenizer.json")):
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        ids = tok.encode(TEXT)
        assert len(ids) < len(TEXT.encode()) and tok.decode(ids) == TEXT  # merges learned, lossless
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == TEXT


def _ranks_file(path, merges=(b"th", b"he", b"the", b" t")):
    tokens = [bytes([i]) for i in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_tiktoken_ranks_file_round_trip(tmp_path):
    path = _ranks_file(tmp_path / "tokenizer.model")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, TiktokenTokenizer)
    text = "the theme: " + TEXT
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 258 in ids  # the "the" merge is used
    assert tok.vocab_size == 260 + 256 and tok.bos_id == 260 and tok.eos_id == 261
    assert tok.encode("<|begin_of_text|>") != [tok.bos_id]  # special text in documents stays plain text
    assert isinstance(load_tokenizer(str(tmp_path)), TiktokenTokenizer)  # a directory holding tokenizer.model
    # A changed file at the same path is re-read (no stale cache keyed by the path).
    _ranks_file(path, merges=(b"th",))
    assert load_tokenizer(str(path)).vocab_size == 257 + 256


def test_tokenizer_errors_name_the_fix(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist: use 'byte'"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(TokenizerError, match="holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not a tokenizer")
    with pytest.raises(TokenizerError, match="cannot read tokenizer .*bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_text("dGhl 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match=r"bad\.model line 2 is not '<base64 token> <rank>'"):
        load_tokenizer(str(tmp_path / "bad.model"))
    (tmp_path / "gap.model").write_text("dGg= 0\naGU= 5\n")
    with pytest.raises(TokenizerError, match="without gaps"):
        load_tokenizer(str(tmp_path / "gap.model"))
