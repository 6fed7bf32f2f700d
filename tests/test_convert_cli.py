"""``python -m convert`` on bad input: one sentence on stderr, exit status 2, no destination left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_fixtures import tiny_hf_model
from safetensors import safe_open
from safetensors.numpy import save_file

from convert import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A good tiny HF checkpoint, sharded so the index path is exercised too."""
    path = tmp_path_factory.mktemp("good") / "hf"
    tiny_hf_model(seed=11).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def ckpt_dir(hf_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "ckpt"
    assert cli.main(["hf-to-flax", str(hf_dir), str(path)]) == 0
    return path


def run_bad(argv: list[str], capsys, match: str) -> str:
    """Run the CLI, expect exit status 2 with ``match`` in a one-line message and no destination."""
    dst = Path(argv[2])
    existed = dst.exists()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ringllama-convert: error: "), err
    assert match in err[0], err[0]
    if not existed:
        assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*")), "a staging directory was left behind"
    return err[0]


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_shard(path: Path, edit) -> None:
    """Rewrite the shard holding layer 0's q_proj after ``edit(tensors)``."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"
    file = path / index["weight_map"][name]
    with safe_open(str(file), "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = edit(tensors)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != file.name}
    index["weight_map"].update({k: file.name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, str(file), metadata={"format": "pt"})


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*-of-*.safetensors"))


def _drop_q(t):
    del t["model.layers.0.self_attn.q_proj.weight"]
    return t


def _add_extra(t):
    t["model.layers.0.self_attn.q_norm.weight"] = t["model.layers.0.self_attn.q_proj.weight"][0].copy()
    return t


HF_CASES = {
    "missing tensor": (lambda p: edit_shard(p, _drop_q), "lacks model.layers.0.self_attn.q_proj.weight"),
    "unexpected tensor": (lambda p: edit_shard(p, _add_extra), "unexpected tensor model.layers.0.self_attn.q_norm"),
    "wrong shape": (lambda p: edit_config(p, intermediate_size=80), "but config.json implies"),
    "unknown rope type": (
        lambda p: edit_config(p, rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}),
        "unknown rope type 'spiral'",
    ),
    "non-Llama architecture": (
        lambda p: edit_config(p, architectures=["MistralForCausalLM"], model_type="mistral"),
        "unsupported architecture",
    ),
    "missing config": (lambda p: (p / "config.json").unlink(), "no config.json"),
    "truncated safetensors": (
        lambda p: os.truncate(shards(p)[1], 300),
        "truncated or corrupt",
    ),
    "corrupt safetensors": (
        lambda p: shards(p)[2].write_bytes(os.urandom(2000)),
        "truncated or corrupt",
    ),
    "missing shard": (lambda p: shards(p)[3].unlink(), "is missing"),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_flax_bad_input(case, hf_dir, tmp_path, capsys):
    break_it, match = HF_CASES[case]
    src = copy_of(hf_dir, tmp_path)
    assert len(shards(src)) > 3
    break_it(src)
    run_bad(["hf-to-flax", str(src), str(tmp_path / "out")], capsys, match)


def test_destination_exists_is_refused_untouched(hf_dir, ckpt_dir, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    run_bad(["hf-to-flax", str(hf_dir), str(dst)], capsys, "already exists")
    run_bad(["flax-to-hf", str(ckpt_dir), str(dst)], capsys, "already exists")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_flax_to_hf_bad_input(hf_dir, ckpt_dir, tmp_path, capsys):
    run_bad(["flax-to-hf", str(hf_dir), str(tmp_path / "o1")], capsys, "not a ringllama checkpoint")
    run_bad(
        ["flax-to-hf", str(ckpt_dir), str(tmp_path / "o2"), "--max-shard-size", "5XB"], capsys, "cannot read the size"
    )
    # A config that no longer matches the stored parameters.
    bad = copy_of(ckpt_dir, tmp_path)
    cfg = json.loads((bad / "ringllama_config.json").read_text())
    cfg["num_layers"] = 3
    (bad / "ringllama_config.json").write_text(json.dumps(cfg))
    run_bad(["flax-to-hf", str(bad), str(tmp_path / "o3")], capsys, "the checkpoint and its config disagree")
    for data in (bad / "params").rglob("ocdbt.process_*/d/*"):
        data.write_bytes(b"")  # array data lost, metadata intact
    cfg["num_layers"] = 2
    (bad / "ringllama_config.json").write_text(json.dumps(cfg))
    run_bad(["flax-to-hf", str(bad), str(tmp_path / "o6")], capsys, "cannot restore the orbax parameters")
    (bad / "params" / "_METADATA").write_text("{not json")
    run_bad(["flax-to-hf", str(bad), str(tmp_path / "o4")], capsys, "cannot read the orbax parameters")
    shutil.rmtree(bad / "params")
    run_bad(["flax-to-hf", str(bad), str(tmp_path / "o5")], capsys, "has no params/ directory")


def test_meta_to_flax_bad_input(tmp_path, capsys):
    src = tmp_path / "meta"
    src.mkdir()
    run_bad(["meta-to-flax", str(src), str(tmp_path / "o1")], capsys, "no params.json")
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    run_bad(["meta-to-flax", str(src), str(tmp_path / "o2")], capsys, "no consolidated.*.pth")
    (src / "consolidated.00.pth").write_bytes(b"not a zip file")
    run_bad(["meta-to-flax", str(src), str(tmp_path / "o3")], capsys, "not a readable torch checkpoint")


def test_bad_flag_is_status_2(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["hf-to-flax", str(hf_dir), str(tmp_path / "o"), "--dtype", "int8"])
    assert exc.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_exit_status(tmp_path):
    """The real process: ``python -m convert`` exits 2 with the sentence on stderr."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "convert", "hf-to-flax", str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ringllama-convert: error: ")
    assert "is not a directory" in proc.stderr
    assert not (tmp_path / "out").exists()
    help_text = subprocess.run(
        [sys.executable, "-m", "convert", "flax-to-hf", "--help"], capture_output=True, text=True, cwd=REPO, env=env
    ).stdout
    assert "--max-shard-size" in help_text and "--dtype" in help_text
