"""The synthetic-data generator: determinism, exact lengths, needle placement, answers, haystacks."""

import numpy as np
import pytest

from text import (
    FILLER,
    PASSKEY_INTRO,
    HaystackError,
    OverheadError,
    haystack_text,
    load_haystack,
    multi_niah_sample,
    niah_sample,
    passkey_sample,
    token_stream,
)
from text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _find(haystack: list[int], needle: list[int]) -> int:
    n = len(needle)
    for i in range(len(haystack) - n + 1):
        if haystack[i : i + n] == needle:
            return i
    return -1


def test_haystack_text_is_prose_from_pydoc():
    text = haystack_text()
    assert len(text) > 200_000
    assert "::=" not in text and ">>>" not in text
    assert "\n" not in text
    words = text.split()
    assert sum(w.isalpha() for w in words) > 0.6 * len(words)


@pytest.mark.parametrize("length", [300, 1024, 2000])
@pytest.mark.parametrize("filler", ["classic", "prose"])
def test_passkey_exact_length_and_deterministic(length, filler):
    a = passkey_sample(TOK, length, 0.3, rng=7, filler=filler)
    b = passkey_sample(TOK, length, 0.3, rng=np.random.default_rng(7), filler=filler)
    c = passkey_sample(TOK, length, 0.3, rng=8, filler=filler)
    assert len(a.prompt_ids) == length
    assert a == b
    assert a.prompt_ids != c.prompt_ids
    assert a.answer.isdigit() and len(a.answer) == 5 and a.references == (a.answer,)
    assert TOK.decode(a.answer_ids).strip() == a.answer
    text = TOK.decode(a.prompt_ids)
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert text.endswith("What is the pass key? The pass key is")
    assert f"The pass key is {a.answer}. Remember it. {a.answer} is the pass key." in text
    assert a.prompt_ids[0] == TOK.bos_id


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_at_requested_depth(depth):
    """The needle starts within one filler sentence of ``depth`` × haystack tokens."""
    length = 4000
    s = passkey_sample(TOK, length, depth, rng=1)
    needle = TOK.encode(f" The pass key is {s.answer}. Remember it. {s.answer} is the pass key.")
    start = _find(s.prompt_ids, needle)
    assert start == s.metadata["needle_token_starts"][0]
    head = 1 + len(TOK.encode(PASSKEY_INTRO + "\n"))  # BOS + instructions
    tail = len(TOK.encode("\nWhat is the pass key? The pass key is"))
    budget = length - head - tail - len(needle)  # haystack tokens
    half_sentence = max(len(TOK.encode(" " + x)) for x in FILLER.split(". ")) / 2 + 1
    assert abs((start - head) - depth * budget) <= half_sentence
    assert abs(s.metadata["needle_depths"][0] - depth) <= half_sentence / budget


def test_niah_and_multi_needle():
    s = niah_sample(
        TOK,
        1500,
        0.5,
        rng=3,
        needle="The magic word is banana.",
        question="What is the magic word?",
        answer="banana",
        haystack="prose",
    )
    assert len(s.prompt_ids) == 1500 and s.answer == "banana"
    assert "The magic word is banana." in TOK.decode(s.prompt_ids)
    m = multi_niah_sample(TOK, 3000, [0.1, 0.5, 0.9], rng=4, haystack="noise")
    assert len(m.prompt_ids) == 3000 and len(m.references) == 3
    starts = m.metadata["needle_token_starts"]
    assert starts == sorted(starts)
    for ref in m.references:
        assert ref in TOK.decode(m.prompt_ids)
    assert np.allclose(m.metadata["needle_depths"], [0.1, 0.5, 0.9], atol=0.02)


def test_prose_haystack_start_varies_with_seed():
    starts = {niah_sample(TOK, 800, 0.5, rng=i).metadata["haystack_start_sentence"] for i in range(5)}
    assert len(starts) > 1


def test_long_prompt_wraps_the_haystack():
    stream = token_stream(TOK, load_haystack("prose"))
    n = len(stream.ids) + 5000
    s = niah_sample(TOK, n, 0.7, rng=0)
    assert len(s.prompt_ids) == n


def test_bad_inputs():
    with pytest.raises(OverheadError, match="below the prompt overhead"):
        passkey_sample(TOK, 100, 0.5, rng=0)
    with pytest.raises(ValueError, match="fraction"):
        passkey_sample(TOK, 1000, 50, rng=0)
    with pytest.raises(HaystackError, match="cannot read haystack file"):
        niah_sample(TOK, 1000, 0.5, haystack="/nonexistent/haystack.txt")


def test_niah_over_the_depth_grid_keeps_length_and_order():
    """The training-mix workload (2048 tokens, depths 0.0–1.0): exact lengths, needles in depth order.

    Its speed (under 50 ms a prompt) is a benchmark: ``python -m benchmarks.synthetic_speed``.
    """
    samples = [niah_sample(TOK, 2048, i / 10, rng=i) for i in range(11)]
    assert all(len(s.prompt_ids) == 2048 for s in samples)
    starts = [s.metadata["needle_token_starts"][0] for s in samples]
    assert starts == sorted(starts) and starts[0] < starts[-1]


def test_loss_mask_marks_answer_targets():
    s = passkey_sample(TOK, 400, 0.5, rng=0)
    ids, mask = s.input_ids, s.loss_mask
    assert len(ids) == len(mask)
    targets = [ids[i + 1] for i in range(len(ids) - 1) if mask[i]]
    assert targets == s.answer_ids


def test_haystack_from_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "hay.txt"
    txt.write_text("Alpha beta gamma delta. Epsilon zeta eta theta.\n\nIota kappa lambda mu.")
    s = niah_sample(TOK, 600, 0.5, rng=0, haystack=str(txt))
    assert len(s.prompt_ids) == 600 and "Epsilon zeta eta theta." in TOK.decode(s.prompt_ids)
    jl = tmp_path / "hay.jsonl"
    jl.write_text('{"text": "Red foxes run quickly."}\n{"text": "Blue whales sing loudly."}\n')
    s = niah_sample(TOK, 600, 0.5, rng=0, haystack=str(jl))
    text = TOK.decode(s.prompt_ids)
    assert "Red foxes run quickly." in text and "Blue whales sing loudly." in text
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(HaystackError, match="empty"):
        niah_sample(TOK, 600, 0.5, haystack=str(empty))
