"""Evals against transformers on a tiny HF model built locally, and the CLI end to end.

ringllama's teacher-forced argmax answers and greedy generations must equal transformers'
on the same prompts; the CLI must write JSON, CSV and a heatmap PNG of the documented size,
and refuse bad input with exit status 2 and no results directory.
"""

import json
import os

import numpy as np
import pytest
import torch
from evals_fixtures import tiny_hf_dir

from evals.cli import main
from evals.loading import load_eval_tokenizer, load_model
from evals.report import HEATMAP_DPI, HEATMAP_SIZE
from evals.runner import Runner
from evals.tasks import Cell, cell_rng
from text import ByteTokenizer, niah_sample, passkey_sample


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_hf"))
    hf = tiny_hf_dir(d)
    cfg, params = load_model(d)
    tok = load_eval_tokenizer(d, None, cfg)
    return d, hf, cfg, params, tok


@pytest.fixture(scope="module")
def samples(hf_setup):
    _, _, _, _, tok = hf_setup
    return [
        passkey_sample(tok, 200, 0.3, rng=1),
        passkey_sample(tok, 200, 0.9, rng=2, filler="prose"),
        niah_sample(tok, 200, 0.5, rng=3, needle="The magic word is banana.", question="What is the magic word?",
                    answer="banana"),
    ]  # fmt: skip


def test_tokenizer_is_the_checkpoints_own(hf_setup, samples):
    _, _, _, _, tok = hf_setup
    assert tok.vocab_size == 384 and tok.bos_id == 1
    assert all(len(s.prompt_ids) == 200 and s.prompt_ids[0] == 1 for s in samples)
    assert tok.decode(samples[0].answer_ids).strip() == samples[0].answer


def test_forced_answers_equal_transformers(hf_setup, samples):
    _, hf, cfg, params, _ = hf_setup
    results = Runner(cfg, params, batch_size=2).forced(samples)
    for s, r in zip(samples, results, strict=True):
        seq = torch.tensor([s.prompt_ids + s.answer_ids[:-1]])
        with torch.no_grad():
            logits = hf(seq).logits[0, len(s.prompt_ids) - 1 :].double()
        expected = logits.argmax(-1).tolist()
        assert r.argmax_ids == expected
        lp = torch.log_softmax(logits, -1)[torch.arange(len(s.answer_ids)), torch.tensor(s.answer_ids)].sum()
        assert r.answer_logprob == pytest.approx(float(lp), rel=1e-4, abs=1e-4)
        assert r.correct == (expected == s.answer_ids)


def test_forced_scores_a_known_answer_correct(hf_setup, samples):
    """Use the model's own argmax as the answer: teacher forcing must call it correct, and one token off wrong."""
    _, _, cfg, params, _ = hf_setup
    runner = Runner(cfg, params, batch_size=2)
    s = samples[0]
    first = runner.forced([s])[0]
    import dataclasses

    own = dataclasses.replace(s, answer_ids=first.argmax_ids[:1])
    assert runner.forced([own])[0].correct
    wrong = dataclasses.replace(own, answer_ids=[(own.answer_ids[0] + 1) % 384])
    assert not runner.forced([wrong])[0].correct


def test_generated_answers_equal_transformers(hf_setup, samples):
    _, hf, cfg, params, _ = hf_setup
    new = 8
    got = Runner(cfg, params, batch_size=3).generate(samples, new)
    prompts = torch.tensor([s.prompt_ids for s in samples])
    with torch.no_grad():
        out = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    for row, g in zip(out[:, prompts.shape[1] :].tolist(), got, strict=True):
        cut = row.index(2) if 2 in row else len(row)
        assert g == row[:cut]


def _cli(args, tmp_path):
    return main([*args, "--no-progress", "--out", str(tmp_path)])


def test_cli_end_to_end_writes_json_csv_and_heatmap(hf_setup, tmp_path, capsys):
    d = hf_setup[0]
    out = tmp_path / "niah"
    rc = _cli(["niah", "--model", d, "--hf", "--lengths", "200,250", "--depths", "0:100:50", "--samples", "2",
               "--batch-size", "2"], out)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "depth" in printed and "niah" in printed
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 2 * 3 * 2
    assert {r["length"] for r in data["records"]} == {200, 250}
    assert {r["depth_percent"] for r in data["records"]} == {0.0, 50.0, 100.0}
    assert len(data["aggregates"]["by_cell"]) == 6
    csv_lines = (out / "records.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 12 and csv_lines[0].startswith("task,length,depth_percent")
    import matplotlib.image

    img = matplotlib.image.imread(str(out / "heatmap_niah.png"))
    assert img.shape[:2] == (int(HEATMAP_SIZE[1] * HEATMAP_DPI), int(HEATMAP_SIZE[0] * HEATMAP_DPI))
    assert img[..., :3].std() > 0.05  # not a blank image
    assert (out / "accuracy_vs_length.png").is_file()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # the staging dir was renamed


def test_cli_generate_mode_ruler(hf_setup, tmp_path):
    out = tmp_path / "ruler"
    rc = _cli(["ruler", "--model", hf_setup[0], "--tasks", "niah_single_1", "--lengths", "320", "--samples", "1",
               "--mode", "generate"], out)  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["task"] for r in data["records"]] == ["niah_single_1"]
    assert all(0.0 <= r["score"] <= 1.0 and r["mode"] == "generate" for r in data["records"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["passkey", "--model", "/nonexistent/model"], "does not exist"),
        (["passkey", "--model", "preset:tiny", "--lengths", "64"], "below the prompt overhead"),
        (["niah", "--model", "preset:tiny", "--haystack", "/nonexistent/hay.txt"], "cannot read haystack file"),
        (["ruler", "--model", "preset:tiny", "--tasks", "niah_single_9"], "unknown RULER task"),
        (["passkey", "--model", "preset:tiny", "--depths", "0:200:50"], "between 0 and 100"),
        (["perplexity", "--model", "preset:tiny", "--data", "/nonexistent/text.txt"], "cannot read text data"),
    ],
)
def test_cli_bad_input_exits_2(args, message, tmp_path, capsys):
    out = tmp_path / "res"
    assert _cli(args, out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not os.listdir(tmp_path)


def test_cli_passkey_template_short(tmp_path, capsys):
    """``--template short`` (the demo's passkey prompt, no instruction head) fits where the classic one cannot."""
    args = ["passkey", "--model", "preset:tiny", "--lengths", "160", "--depths", "50", "--samples", "1"]
    assert _cli(args, tmp_path / "classic") == 2
    assert "below the prompt overhead" in capsys.readouterr().err
    out = tmp_path / "short"
    assert _cli([*args, "--template", "short"], out) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["template"] == "short"
    # The scored sample is the short-template one the cell's seed draws.
    expected = passkey_sample(
        ByteTokenizer(), 160, 0.5, rng=cell_rng(0, Cell("passkey", 160, 0.5), 0), template="short"
    )
    (record,) = data["records"]
    assert record["prompt_tokens"] == len(expected.prompt_ids) == 160 and record["answer"] == expected.answer
    with pytest.raises(SystemExit) as exc:
        _cli([*args, "--template", "long"], tmp_path / "bad")
    assert exc.value.code == 2 and "invalid choice: 'long'" in capsys.readouterr().err


def test_cli_unknown_task_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(["needles", "--model", "preset:tiny"], tmp_path / "res")
    assert exc.value.code == 2
    assert "invalid choice: 'needles'" in capsys.readouterr().err


def test_unreadable_haystack_file(tmp_path, capsys):
    bad = tmp_path / "hay.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xff")
    assert _cli(["niah", "--model", "preset:tiny", "--haystack", str(bad)], tmp_path / "res") == 2
    assert "cannot read haystack file" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_perplexity_cli(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 200))
    out = tmp_path / "ppl"
    assert _cli(["perplexity", "--model", "preset:tiny", "--lengths", "128", "--samples", "2", "--buckets", "4",
                 "--data", str(text)], out) == 0  # fmt: skip
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    assert len(recs) == 4 and all(np.isfinite(r["ppl"]) and r["ppl"] > 1 for r in recs)
    assert sum(r["tokens"] for r in recs if r["length"] == 128) == 2 * 127
    assert (out / "perplexity_vs_position.png").is_file()
