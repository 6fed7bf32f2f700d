"""RULER-style and QA generators: determinism, exact lengths, references hidden in the prompt, correct answers."""

import json
import re
from collections import Counter

import pytest

from evals.chat import llama3_chat_format
from evals.loading import EvalInputError
from evals.qa import qa_sample
from evals.ruler import RULER_TASKS, ruler_sample
from evals.tasks import TASKS, TaskSettings, command_tasks, make_task
from text.haystack import HaystackError
from text.synthetic import passkey_sample
from text.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


@pytest.mark.parametrize("task", RULER_TASKS)
def test_ruler_task_exact_length_deterministic_and_answerable(task):
    a = ruler_sample(task, TOK, 1500, rng=5)
    b = ruler_sample(task, TOK, 1500, rng=5)
    c = ruler_sample(task, TOK, 1500, rng=6)
    assert a == b and a.prompt_ids != c.prompt_ids
    assert len(a.prompt_ids) == 1500 and a.prompt_ids[0] == TOK.bos_id
    assert a.references and TOK.decode(a.answer_ids).strip() == a.answer
    text = TOK.decode(a.prompt_ids)
    if task in ("cwe", "fwe"):
        body = text.split("\n")[1]
        words = re.findall(r"[a-z]+", body)
        counts = Counter(words).most_common()
        k = len(a.references)
        assert {w for w, _ in counts[:k]} == set(a.references)
        assert counts[k - 1][1] > counts[k][1]  # the references are strictly the most frequent
    else:
        for ref in a.references:
            assert ref in text


def test_niah_variants_follow_ruler_settings():
    mk1 = ruler_sample("niah_multikey_1", TOK, 3000, rng=1)
    assert TOK.decode(mk1.prompt_ids).count("One of the special magic numbers for") == 4  # 1 real + 3 distractors
    mk2 = ruler_sample("niah_multikey_2", TOK, 3000, rng=1)
    text = TOK.decode(mk2.prompt_ids)
    assert "The grass is green" not in text and text.count("One of the special magic") > 20  # all-distractor
    mk3 = ruler_sample("niah_multikey_3", TOK, 3000, rng=1)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", mk3.answer)
    mv = ruler_sample("niah_multivalue", TOK, 3000, rng=1)
    mq = ruler_sample("niah_multiquery", TOK, 3000, rng=1)
    assert len(mv.references) == 4 and len(mq.references) == 4
    s1 = ruler_sample("niah_single_1", TOK, 3000, rng=1)
    assert "The grass is green" in TOK.decode(s1.prompt_ids) and re.fullmatch(r"\d{7}", s1.answer)
    vt = ruler_sample("vt", TOK, 3000, rng=1)
    text = TOK.decode(vt.prompt_ids)
    assert len(vt.references) == 5 and all(f"VAR {v} =" in text for v in vt.references)


def test_qa_from_squad_and_hotpot_files(tmp_path):
    squad = {
        "data": [
            {
                "title": "Dogs",
                "paragraphs": [
                    {"context": "The dog Rex lives in Oslo and likes to chase red balls every morning.",
                     "qas": [{"question": "Where does Rex live?", "id": "1", "answers": [{"text": "Oslo", "answer_start": 20}]},
                             {"question": "Impossible?", "id": "2", "answers": [], "is_impossible": True}]},
                    {"context": "Cats sleep for most of the day and hunt at night in the old barn.", "qas": []},
                ],
            }
        ]
    }  # fmt: skip
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    s = qa_sample(TOK, 800, rng=0, path=str(path))
    assert len(s.prompt_ids) == 800 and s.references == ("Oslo",) and s.metadata["task"] == "qa"
    assert "The dog Rex lives in Oslo" in TOK.decode(s.prompt_ids)
    hotpot = [
        {"question": "Which city is Ann from?", "answer": "Paris",
         "context": [["Ann", ["Ann was born in Paris. ", "She paints."]], ["Bob", ["Bob likes tea."]]],
         "supporting_facts": [["Ann", 0]]},
    ]  # fmt: skip
    hp = tmp_path / "hotpot.json"
    hp.write_text(json.dumps(hotpot))
    h = qa_sample(TOK, 600, rng=0, path=str(hp))
    assert len(h.prompt_ids) == 600 and h.answer == "Paris" and "Ann was born in Paris." in TOK.decode(h.prompt_ids)
    bad = tmp_path / "bad.json"
    bad.write_text('{"nope": 1}')
    with pytest.raises(HaystackError, match="SQuAD or HotpotQA"):
        qa_sample(TOK, 600, rng=0, path=str(bad))


def test_chat_template_frames_the_prompt(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from text.tokenizer import HFTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.add_special_tokens(specials)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    )
    hf = HFTokenizer(str(tmp_path))
    fmt = llama3_chat_format(hf)
    s = passkey_sample(hf, 500, 0.5, rng=0, fmt=fmt)
    assert len(s.prompt_ids) == 500
    ids = {t: tok.token_to_id(t) for t in specials}
    assert s.prompt_ids[:2] == [ids["<|begin_of_text|>"], ids["<|start_header_id|>"]]
    assert s.prompt_ids.count(ids["<|eot_id|>"]) == 1
    tail = tok.decode(s.prompt_ids[-40:], skip_special_tokens=False)
    assert tail.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nThe pass key is")
    with pytest.raises(ValueError, match="chat tokens"):
        llama3_chat_format(TOK)


def test_task_registry_builds_each_task_from_its_generator(tmp_path):
    """`evals.tasks.TASKS` hands out the generators themselves, with the settings passed through."""
    short = make_task("passkey", TaskSettings(filler="prose", template="short"))
    assert short.uses_depth and short.metric == "all"
    assert short.make(TOK, 400, 0.3, 1, None) == passkey_sample(TOK, 400, 0.3, 1, "prose", template="short")
    for name in RULER_TASKS:
        task = make_task(name)
        assert not task.uses_depth and task.make(TOK, 1500, 0.5, 5, None) == ruler_sample(name, TOK, 1500, rng=5)
    assert {spec.command for spec in TASKS.values()} == {"passkey", "niah", "ruler"}
    # The ruler command runs every RULER task, and qa only once a QA file is given.
    assert [t.name for t in command_tasks("ruler", TaskSettings())] == list(RULER_TASKS)
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps([{"question": "Who?", "answer": "Ann", "context": [["T", ["Ann did it."]]]}]))
    with_qa = command_tasks("ruler", TaskSettings(qa_file=str(path)))
    assert [t.name for t in with_qa] == [*RULER_TASKS, "qa"] and with_qa[-1].metric == "part"
    with pytest.raises(EvalInputError, match="unknown RULER task 'passkey'"):
        command_tasks("ruler", TaskSettings(), ["passkey"])
    with pytest.raises(EvalInputError, match="the qa task needs --qa-file"):
        command_tasks("ruler", TaskSettings(), ["qa"])
    with pytest.raises(EvalInputError, match="passkey template 'long' is unknown"):
        make_task("passkey", TaskSettings(template="long"))
