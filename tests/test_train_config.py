"""Run configs: YAML + typed overrides, θ per stage, and bad configs failing before anything compiles.

Every failure here must come from `train.config.validate` / `load_config` (no jit runs: these
tests take milliseconds) and, through the CLI, exit with status 2, one sentence on stderr, and
no run directory left behind.
"""

import ast
import dataclasses
import glob
import inspect
import math
import typing

import pytest
import yaml

import model
from model.config import ConfigError, LlamaConfig, RopeConfig
from sharding.mesh import MeshConfig
from train import cli
from train.config import (
    StageConfig,
    TrainConfig,
    config_help,
    dump_config,
    from_dict,
    load_config,
    model_config,
    validate,
)
from train.data_config import SourceConfig
from train.optim import OptimConfig

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
        ({"optim": {"lr": "fast"}}, "optim.lr must be a float, got 'fast'"),
        ({"stages": [{"seq_len": 64, "steps": "many", "batch_size": 2}]}, "stages.0.steps must be an int"),
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


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load_and_their_dump_reloads_to_the_same_config(path):
    raw = yaml.safe_load(open(path))
    cfg = load_config(path)
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # a run's config.yaml resumes the same run
    assert [s.seq_len for s in cfg.stages] == [s["seq_len"] for s in raw["stages"]]
    assert cfg.optim.lr == float(raw["optim"]["lr"]) and isinstance(cfg.optim.lr, float)
    assert len(cfg.data.sources) == len(raw["data"]["sources"])
    assert model_config(cfg) == model.preset(raw["model"]["preset"]).replace(
        **{k: v for k, v in raw["model"].items() if k != "preset"}
    )


def test_overrides_reach_list_items_and_type_errors_name_the_dotted_path():
    cfg = from_dict(
        {**BASE, "model": "tiny"},  # the shorthand for {preset: tiny}
        ["eval.passkey_lengths=256,512", "stages.1.theta_rule=none", "stages.1.theta=5e5", "lora.targets=q,v"],
    )
    assert cfg.model == {"preset": "tiny"} and model_config(cfg) == model.preset("tiny")
    assert cfg.eval.passkey_lengths == (256, 512) and cfg.lora.targets == ("q", "v")
    assert cfg.stages[1].theta_rule is None and cfg.stages[1].theta == 5e5
    kept = from_dict(BASE, ["model.rope.theta=2e3"])
    assert model_config(kept).rope == dataclasses.replace(model.preset("tiny").rope, theta=2000.0)
    for override, phrase in [
        ("stages.1.batch_size=abc", "stages.1.batch_size must be an int, got 'abc'"),
        ("data.sources.0.weight=high", "data.sources.0.weight must be a float, got 'high'"),
        ("stages.0.pose={chunks: 2}", "stages.0.pose is incomplete (missing stages.0.pose.target_length)"),
        ("stages.1.optim={lr: x}", "stages.1.optim.lr must be a float, got 'x'"),
        ("model.rope.bogus=1", "unknown config field model.rope.bogus"),
        ("model.num_layers=two", "model.num_layers must be an int, got 'two'"),
        ("stages.0.mesh=5", "stages.0.mesh must be a mapping of MeshConfig fields, got 5"),
    ]:
        with pytest.raises(ConfigError) as info:
            validate(from_dict(BASE, [override]), num_devices=8)
        assert phrase in str(info.value) and "\n" not in str(info.value), (override, str(info.value))


def _source_docstrings(cls) -> dict[str, str]:
    """Field → the string literal under it, read from the source (independently of pydantic)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:], strict=False)
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }


def test_help_is_generated_from_the_field_docstrings():
    lines = {line.split(" ")[0].rstrip(":"): line for line in config_help().splitlines()}
    for cls, prefix in [
        (OptimConfig, "optim."),
        (MeshConfig, "mesh."),
        (SourceConfig, "data.sources.N."),
        (LlamaConfig, "model."),
        (RopeConfig, "model.rope."),
        (StageConfig, "stages.N."),
    ]:
        docs = _source_docstrings(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}, cls  # every field documented once
        for name, text in docs.items():
            assert lines[prefix + name].endswith(": " + text), (prefix + name, lines[prefix + name])
    assert lines["optim.warmup_steps"].startswith("optim.warmup_steps (int, default 0): ")
    assert lines["stages.N.seq_len"].startswith("stages.N.seq_len (int, required): ")
