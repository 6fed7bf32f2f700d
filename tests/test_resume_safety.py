"""``--resume`` refuses a config that no longer describes what the checkpoint trained, and keep-N spares branch sources.

One run of three stages (``a`` → ``b`` → ``c``, tiny model, a checkpoint every 2 steps) stops
inside ``b`` (``--stop-after 6``). Each case copies that run directory and resumes it through the
CLI with one edit: edits to what ``a`` or ``b`` train (name, model, LoRA, PoSE, data, length,
optimizer, seed) must exit 2 naming the field and both values and leave every file as it was;
safe edits (a stage appended, a later stage edited or removed, eval/export settings, checkpoint
frequency, how the model is computed) must finish and train what the edited config says.
"""

import copy
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
import yaml
from engine_fixtures import persistent_compile_cache
from jax.sharding import SingleDeviceSharding

import convert
from train import cli
from train.checkpoint import Checkpointer, CheckpointError
from train.config import from_dict, validate
from train.metrics import read_metrics
from train.resume import FINGERPRINT_KEY, check_resume, protected_steps, resumed_base

MODEL = {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
         "head_dim": 8, "max_position_embeddings": 16, "rope": {"theta": 500.0}}  # fmt: skip
RAW = {
    "model": MODEL,
    "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
    "mesh": {"data": 8, "fsdp": 1, "tensor": 1, "sequence": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "stages": [
        {"name": "a", "seq_len": 16, "steps": 4, "batch_size": 8},
        {"name": "b", "seq_len": 32, "steps": 4, "batch_size": 8, "theta_rule": "critical"},
        {"name": "c", "seq_len": 32, "steps": 2, "batch_size": 8},
    ],
    "checkpoint": {"every": 2, "keep": 10, "async_save": False},
    "eval": {"heldout_batches": 0},
    "loss_chunk": 16,
    "progress": False,
    "tensorboard": False,
}  # fmt: skip
STOP = 6  # two steps into b


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module: every resume compiles the same programs as the first run."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _cli(raw, run_dir, *flags):
    path = os.path.join(os.path.dirname(run_dir), f"{os.path.basename(run_dir)}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh)
    return cli.main(["--config", path, "--run-dir", run_dir, *flags])


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """The run stopped inside b: its directory (copy it before resuming)."""
    run_dir = str(tmp_path_factory.mktemp("stopped") / "run")
    assert _cli(RAW, run_dir, "--stop-after", str(STOP)) == 0
    return run_dir


def _copy(stopped, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(stopped, run_dir)
    return run_dir


def _snapshot(run_dir):
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _train(run_dir):
    return [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


def _edit(path, value):
    """RAW with ``path`` (dotted, list items by index) set to ``value``; ``value`` None deletes a list item."""
    raw = copy.deepcopy(RAW)
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[int(last) if isinstance(node, list) else last] = value
    return raw


PASSKEY = {"kind": "synthetic", "task": "passkey", "template": "short", "min_length": 16, "max_length": 32}
REFUSED = {
    # edit: (raw config, words the message must hold: the field, the checkpoint's value, the config's)
    "renamed stage": (_edit("stages.1.name", "b2"), ["name of stages.1", "'b'", "'b2'"]),
    "model field": (_edit("model.hidden_size", 64), ["model.hidden_size", "32", "64"]),
    "model rope": (_edit("model.rope.theta", 1000.0), ["model.rope.theta", "500.0", "1000.0"]),
    "scan layout": (_edit("model.scan_layers", False), ["model.scan_layers", "True", "False"]),
    "lora added": (_edit("lora", {"rank": 4, "alpha": 8.0}), ["lora", "None", "'rank': 4"]),
    "pose on current stage": (
        _edit("stages.1.pose", {"target_length": 64, "chunks": 2}),
        ["pose of stage 'b'", "None", "'target_length': 64"],
    ),
    "data source of current stage": (
        _edit("stages.1.data", {"sources": [PASSKEY]}),
        ["data.sources.0.task of stage 'b'", "'prose'", "'passkey'"],
    ),
    "top-level data mix": (_edit("data.sources.0.weight", 2.0), ["data.sources.0.weight of stage 'a'", "1.0", "2.0"]),
    "seq_len of current stage": (_edit("stages.1.seq_len", 64), ["seq_len of stage 'b'", "32", "64"]),
    "theta of current stage": (
        dict(RAW, stages=[RAW["stages"][0], {**RAW["stages"][1], "theta": 9999.0, "theta_rule": None}]),
        ["theta of stage 'b'", "9999.0"],
    ),
    "steps of current stage": (_edit("stages.1.steps", 6), ["steps of stage 'b'", "4", "6"]),
    "lr of completed stage": (_edit("stages.0.lr", 1e-3), ["optim.lr of stage 'a'", "0.003", "0.001"]),
    "optimizer": (_edit("optim.weight_decay", 0.0), ["optim.weight_decay of stage 'a'", "0.1", "0.0"]),
    "seed": (_edit("seed", 1), ["seed", "0", "1"]),
    "stage inserted before": (
        dict(RAW, stages=[RAW["stages"][0], {**RAW["stages"][2], "name": "new"}, *RAW["stages"][1:]]),
        ["name of stages.1", "'b'", "'new'"],
    ),
    "current stage removed": (dict(RAW, stages=RAW["stages"][:1]), ["stages.1 ('b')", "only 1 stage"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_resume_refuses_a_config_that_changed_what_was_trained(case, stopped, tmp_path, capsys):
    raw, words = REFUSED[case]
    run_dir = _copy(stopped, tmp_path)
    before = _snapshot(run_dir)
    capsys.readouterr()
    assert _cli(raw, run_dir, "--resume") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume: "), errors
    err = errors[0]
    assert err.count(". ") == 0 and err.endswith("."), err  # one sentence
    for word in words:
        assert word in err, (word, err)
    assert f"--init-from {os.path.abspath(run_dir)}/checkpoints/{STOP}" in err, err
    assert "revert the edit" in err and "--run-dir" in err
    assert _snapshot(run_dir) == before  # nothing written, nothing deleted


# Stages added or edited below are shaped like compiled ones (same length, θ, steps, lr): the cache serves them.
def test_resume_after_appending_a_stage_trains_it(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    d = {**RAW["stages"][2], "name": "d"}
    assert _cli(dict(RAW, stages=[*RAW["stages"], d]), run_dir, "--resume") == 0
    records = _train(run_dir)
    assert [r["stage"] for r in records] == ["a"] * 4 + ["b"] * 4 + ["c"] * 2 + ["d"] * 2
    assert [r["step"] for r in records] == list(range(1, 13))
    with open(os.path.join(run_dir, "report.json")) as fh:
        assert json.load(fh)["global_step"] == 12


def test_resume_trains_an_edited_later_stage_as_edited(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    c = {"name": "c", "seq_len": 32, "steps": 4, "batch_size": 8}  # 2 → 4 steps
    assert _cli(dict(RAW, stages=[*RAW["stages"][:2], c]), run_dir, "--resume") == 0
    records = _train(run_dir)
    assert [r["stage"] for r in records] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    b_theta = validate(from_dict(RAW), 8)[1].model.rope.theta
    assert {(r["seq_len"], r["theta"]) for r in records[8:]} == {(32, b_theta)}


def test_resume_without_the_later_stage_ends_after_the_current_one(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    assert _cli(dict(RAW, stages=RAW["stages"][:2]), run_dir, "--resume") == 0
    assert [r["stage"] for r in _train(run_dir)] == ["a"] * 4 + ["b"] * 4
    b_theta = validate(from_dict(RAW), 8)[1].model.rope.theta
    assert convert.read_config(os.path.join(run_dir, "final")).rope.theta == b_theta


def test_resume_with_other_eval_export_and_checkpoint_settings(stopped, tmp_path):
    run_dir = _copy(stopped, tmp_path)
    raw = dict(RAW, eval={"heldout_batches": 1}, export={"hf": True}, checkpoint={"every": 1, "keep": 20})
    assert _cli(raw, run_dir, "--resume") == 0
    assert [r["step"] for r in _train(run_dir)] == list(range(1, 11))
    with Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True) as ck:
        assert ck.all_steps() == [2, 4, 6, 7, 8, 9, 10]  # every 2 before the resume, every step after it
    with open(os.path.join(run_dir, "report.json")) as fh:
        stages = json.load(fh)["stages"]
    assert "perplexity" in stages["b"] and "perplexity" in stages["c"]
    assert os.path.isfile(os.path.join(run_dir, "hf", "config.json"))


def test_how_the_model_is_computed_may_change_and_applies(stopped):
    raw = dict(RAW, model={**MODEL, "attention_chunk": 8, "remat_policy": "full"}, mesh={"data": 2, "sequence": 4})
    cfg = from_dict(raw)
    with Checkpointer(os.path.join(stopped, "checkpoints"), read_only=True) as ck:
        meta = ck.read_meta(STOP)
    base = resumed_base(meta, cfg)
    assert (base.attention_chunk, base.remat_policy) == (8, "full")
    assert base.replace(attention_chunk=512, remat_policy="none").to_dict() == meta["base_model"]
    check_resume(meta, [2, 4, 6], cfg, validate(cfg, 8, base_model=base), os.path.join(stopped, "checkpoints"))


def test_a_checkpoint_without_the_record_is_checked_by_stage_name_with_a_warning(stopped):
    cfg = from_dict(RAW)
    plans = validate(cfg, 8)
    ckpt_dir = os.path.join(stopped, "checkpoints")
    with Checkpointer(ckpt_dir, read_only=True) as ck:
        meta = ck.read_meta(STOP)
    old = {k: v for k, v in meta.items() if k != FINGERPRINT_KEY}
    said = []
    check_resume(old, [2, 4, 6], from_dict(_edit("model.hidden_size", 64)), plans, ckpt_dir, say=said.append)
    assert len(said) == 1 and "predates resume checks" in said[0]
    with pytest.raises(CheckpointError, match="name of stages.1 is 'b'"):
        renamed = from_dict(_edit("stages.1.name", "b2"))
        check_resume(old, [2, 4, 6], renamed, validate(renamed, 8), ckpt_dir, say=said.append)
    # A stage appended as a branch from `a` needs a's stage-end checkpoint (step 4), refused up front without it.
    branched = from_dict(dict(RAW, stages=[*RAW["stages"], {"name": "x", "seq_len": 16, "steps": 1, "from": "a"}]))
    check_resume(meta, [2, 4, 6], branched, validate(branched, 8), ckpt_dir)
    with pytest.raises(CheckpointError, match="branches from 'a', whose stage-end checkpoint \\(global step 4\\)"):
        check_resume(meta, [2, 6], branched, validate(branched, 8), ckpt_dir)


# a and b as above, then a branch from a shaped like a (all compiled already); keep=1.
BRANCHED = dict(RAW, stages=[*RAW["stages"][:2], {"name": "br", "seq_len": 16, "steps": 4, "batch_size": 8,
                                                   "from": "a"}], checkpoint={"every": 2, "keep": 1})  # fmt: skip


def test_keep_spares_the_checkpoint_a_later_branch_starts_from(tmp_path):
    assert protected_steps(validate(from_dict(BRANCHED), 8)) == {4}
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert _cli(BRANCHED, straight) == 0
    assert _cli(BRANCHED, resumed, "--stop-after", str(STOP)) == 0  # inside b: keep=1 alone would delete step 4
    with Checkpointer(os.path.join(resumed, "checkpoints"), read_only=True) as ck:
        assert ck.all_steps() == [4, 6]
    assert _cli(BRANCHED, resumed, "--resume") == 0
    # br restarted from a's checkpoint after the resume and trained exactly as in the uninterrupted run.
    assert [(r["stage"], r["loss"]) for r in _train(resumed)] == [(r["stage"], r["loss"]) for r in _train(straight)]
    assert [r["stage"] for r in _train(resumed)] == ["a"] * 4 + ["b"] * 4 + ["br"] * 4
    with Checkpointer(os.path.join(resumed, "checkpoints"), read_only=True) as ck:
        assert ck.all_steps() == [4, 12]


def test_init_from_a_training_checkpoint_starts_a_new_curriculum_from_its_weights(stopped, tmp_path):
    """The refusal's third way out: --init-from <run>/checkpoints/<step> loads that step's params and model."""
    step_dir = os.path.join(stopped, "checkpoints", str(STOP))
    run_dir = str(tmp_path / "new")
    raw = dict(RAW, model={"preset": "tiny", "dtype": "float32"}, stages=[{"name": "n", "seq_len": 32, "steps": 0}])
    assert _cli(raw, run_dir, "--init-from", step_dir) == 0
    model_cfg, params = convert.load_model(os.path.join(run_dir, "final"))
    b = validate(from_dict(RAW), 8)[1].model
    assert model_cfg.to_dict() == b.to_dict()  # the checkpoint's model (b's θ), not the config's preset
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=SingleDeviceSharding(jax.devices()[0])),
                          params)  # fmt: skip
    with Checkpointer(os.path.join(stopped, "checkpoints"), read_only=True) as ck:
        want = ck.restore_params(STOP, shapes)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
