"""Curriculum branches (a stage's ``from:``) and the report's ``extension`` object, through `train.curriculum.run`.

One branched run — ``s1`` (128 tokens) → ``ctl`` (256, θ unchanged) and ``ext`` (256, θ from the
critical rule), both ``from: s1`` — against a linear run ``s1`` → ``ext``: the branched ``ext``
must end bitwise equal to the linear one, which holds only if it started from exactly ``s1``'s
final state (not from ``ctl``'s) and read the same data. The branched run's ``report.json``
must carry an ``extension`` object whose numbers are the per-stage passkey tables'.
"""

import json
import os

import jax
import numpy as np
import pytest

import convert
from model.config import ConfigError
from train.config import from_dict, validate
from train.curriculum import run
from train.stage import stage_depth

SOURCE = {"kind": "synthetic", "task": "passkey", "template": "short", "min_length": 110, "max_length": 128}
BASE = {
    "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 8, "max_position_embeddings": 128, "rope": {"theta": 1000.0}},
    "data": {"sources": [SOURCE]},
    "mesh": {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 1, "schedule": "constant"},
    "checkpoint": {"every": 0, "keep": 5, "async_save": False},
    "eval": {"heldout_batches": 0},
    "loss_chunk": 128,
    "tensorboard": False,
    "progress": False,
}  # fmt: skip
S1 = {"name": "s1", "seq_len": 128, "steps": 3, "batch_size": 8}
EXT = {"name": "ext", "seq_len": 256, "steps": 2, "batch_size": 4, "theta_rule": "critical"}
PASSKEY = {"heldout_batches": 1, "passkey_lengths": [128, 256, 512], "passkey_samples": 2,
           "passkey_depths": [0.5], "passkey_template": "short", "passkey_batch": 2}  # fmt: skip


def _final(run_dir):
    return convert.load_model(os.path.join(run_dir, "final"))[1]


def test_branch_starts_from_its_source_bitwise_and_report_has_extension(tmp_path):
    branched = dict(BASE, stages=[S1, {**EXT, "name": "ctl", "theta_rule": None, "from": "s1"}, {**EXT, "from": "s1"}],
                    eval=PASSKEY, run_dir=str(tmp_path / "branched"))  # fmt: skip
    linear = dict(BASE, stages=[S1, EXT], run_dir=str(tmp_path / "linear"))
    cfg = from_dict(branched)
    plans = validate(cfg, 8)
    assert [stage_depth(plans, p) for p in plans] == [0, 1, 1]  # siblings read the same data stream
    assert plans[1].model.rope.theta == 1000.0 and plans[2].model.rope.theta > 1000.0
    result = run(cfg, say=lambda *a, **k: None)
    run(from_dict(linear), say=lambda *a, **k: None)

    a, b = _final(tmp_path / "branched"), _final(tmp_path / "linear")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    with open(tmp_path / "branched" / "report.json") as fh:
        report = json.load(fh)
    assert report == json.loads(json.dumps(result.report))
    ext, stages = report["extension"], report["stages"]
    acc = {name: s["passkey"]["accuracy"] for name, s in stages.items()}
    assert (ext["train_length"], ext["target_length"]) == (128, 256)
    assert ext["stage1_at_train"] == acc["s1"]["128"] and ext["stage1_at_target"] == acc["s1"]["256"]
    assert ext["extended_at_target"] == acc["ext"]["256"] and ext["extended_at_2x_target"] == acc["ext"]["512"]
    assert ext["control_at_target"] == acc["ctl"]["256"]
    assert (ext["stage1"]["stage"], ext["extended"]["stage"], ext["control"]["stage"]) == ("s1", "ext", "ctl")
    assert ext["branches"] == [] and stages["ext"]["from"] == stages["ctl"]["from"] == "s1"
    assert os.path.isfile(tmp_path / "branched" / ext["figure"])


def test_from_must_name_an_earlier_stage():
    raw = dict(BASE, stages=[S1, {**EXT, "from": "later"}, {**EXT, "name": "later"}])
    with pytest.raises(ConfigError, match="not an earlier stage"):
        validate(from_dict(raw), 8)
    with pytest.raises(ConfigError, match="used by an earlier stage"):
        validate(from_dict(dict(BASE, stages=[S1, S1])), 8)
