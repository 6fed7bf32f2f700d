"""Run configs: YAML + typed overrides, θ per stage, and bad configs failing before anything compiles.

Every failure here must come from `train.config.validate` / `load_config` (no jit runs: these
tests take milliseconds) and, through the CLI, exit with status 2, one sentence on stderr, and
no run directory left behind.
"""

import dataclasses
import math
import typing

import pytest
import yaml

import model
from model.config import ConfigError, LlamaConfig
from train import cli
from train.config import StageConfig, TrainConfig, config_help, from_dict, load_config, validate

BASE = {
    "model": {"preset": "tiny", "max_position_embeddings": 64, "rope": {"theta": 1000.0}},
    "mesh": {"data": 2, "fsdp": 1, "sequence": 4},
    "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
    "stages": [
        {"seq_len": 64, "steps": 2, "batch_size": 4},
        {"seq_len": 256, "steps": 2, "batch_size": 2, "theta_rule": "critical"},
    ],
}


def test_overrides_are_typed_and_reach_nested_fields_and_list_items():
    cfg = from_dict(
        BASE,
        ["stages.1.steps=7", "optim.lr=1e-3", "eval.passkey_lengths=[256, 512]", "model.rope.theta=2e3", "seed=3"],
    )
    assert cfg.stages[1].steps == 7 and isinstance(cfg.stages[1].steps, int)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.eval.passkey_lengths == (256, 512)
    assert cfg.seed == 3
    plans = validate(cfg, num_devices=8)
    assert plans[0].model.rope.theta == 2000.0


def test_stage_theta_from_the_rule_and_max_positions():
    plans = validate(from_dict(BASE), num_devices=8)
    assert [p.model.max_position_embeddings for p in plans] == [64, 256]
    assert plans[0].model.rope.theta == 1000.0  # unset θ keeps the model's
    expected = model.theta_for_length(256, 1000.0, 64, head_dim=16, rule="critical")
    assert math.isclose(plans[1].model.rope.theta, expected, rel_tol=1e-12)
    assert plans[1].model.rope.theta > 1000.0
    assert [p.layout for p in plans] == ["zigzag", "zigzag"]  # auto: zigzag when sequence > 1
    assert plans[1].mesh_shape == (2, 1, 1, 4)


def test_gradient_recipe_thetas_are_taken_as_given():
    cfg = load_config("configs/llama3-8b-1m.yaml")
    thetas = [s.theta for s in cfg.stages]
    assert thetas == [15.3e6, 207.1e6, 1.06e9, 2.80e9]
    assert [s.seq_len for s in cfg.stages] == [65536, 262144, 524288, 1048576]
    plans = validate(cfg, num_devices=512)
    assert plans[-1].model.max_position_embeddings == 1048576


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["stages.0.stepz=3"], "unknown config field stages.0.stepz"),
        (["optimizer.lr=1"], "unknown config field optimizer"),
        (["model.hidden=3"], "unknown config field model.hidden"),
        (["stages.0.seq_len=100"], "sequence length 100 does not fit the zigzag layout"),
        (["mesh.data=4"], "needs 16 devices but 8 are available"),
        (
            ["data.sources.0.kind=files", "data.sources.0.path=/no/such/file.jsonl"],
            "/no/such/file.jsonl does not exist",
        ),
        (["stages.0.batch_size=3"], "not divisible by the 2 batch shards"),
        (["optim.lr=fast"], "optim.lr must be a float"),
        (["stages.1.theta=5e5"], "sets both theta and theta_rule"),
        (["stages.9.steps=1"], "indexes a list of 2 items"),
    ],
)
def test_bad_configs_fail_before_compiling_with_one_sentence(overrides, phrase):
    with pytest.raises(ValueError) as info:
        validate(from_dict(BASE, overrides), num_devices=8)
    message = str(info.value)
    assert phrase in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        ({"stages": [{"seq_len": 64, "steps": 1, "batch_size": 2, "colour": "red"}]}, "stages.0.colour"),
        ({"stages": [{"seq_len": 60, "steps": 1, "batch_size": 2}]}, "does not fit the zigzag layout"),
        ({"mesh": {"data": 3, "fsdp": 1, "sequence": 4}}, "needs 12 devices but 8 are available"),
        ({"data": {"sources": [{"kind": "files", "path": "missing.jsonl"}]}}, "missing.jsonl does not exist"),
    ],
)
def test_cli_exits_2_on_a_bad_config_and_leaves_no_run_dir(tmp_path, capsys, edit, phrase):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, **edit}))
    run_dir = tmp_path / "run"
    assert cli.main(["--config", str(path), "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and phrase in err and "\n" not in err
    assert not run_dir.exists()


def test_cli_rejects_a_missing_config_file_and_a_malformed_override(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--config", "configs/demo.yaml", "--set", "optim.lr"]) == 2
    assert "is not key=value" in capsys.readouterr().err


def _all_fields(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        target = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if target is not None and dataclasses.is_dataclass(target):
            sep = ".N." if typing.get_origin(tp) is tuple else "."
            yield f"{prefix}{f.name}"
            yield from _all_fields(target, f"{prefix}{f.name}{sep}")
        else:
            yield f"{prefix}{f.name}"


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    names = list(_all_fields(TrainConfig))
    names += [f"model.{f.name}" for f in dataclasses.fields(LlamaConfig)] + ["model.preset", "model.hf_config"]
    assert len(names) > 60
    lines = {line.split(" ")[0].rstrip(":"): line for line in text.splitlines() if line and not line.startswith(" ")}
    missing = [n for n in names if n not in lines]
    assert not missing, missing
    undocumented = [n for n in names if not lines[n].split(":", 1)[-1].strip() or lines[n].endswith("):")]
    assert not undocumented, undocumented
    for flag in ("--config", "--set", "--resume", "--init-from", "--run-dir", "--coordinator", "--stop-after"):
        assert flag in text
    assert config_help().count("\n") + 1 == len([ln for ln in config_help().splitlines()])


def test_stage_config_requires_length_and_steps():
    with pytest.raises(ConfigError, match="incomplete"):
        from_dict({**BASE, "stages": [{"steps": 3}]})
    assert StageConfig(seq_len=8, steps=1).carry_optimizer_state is True
