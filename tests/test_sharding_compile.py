"""``python -m sharding compile`` / ``python -m train compile``: a run's train step compiled for a TPU slice.

The TPU compiles are deviceless (libtpu's compiler with abstract v5p devices; `make test` installs
libtpu) and the CUDA one is an export, so nothing here needs an accelerator.
"""

import importlib.util
import json

import pytest

from sharding import topology
from train import compile as compile_cmd

# A model with TPU-shaped dims (head_dim 128, hidden a multiple of 128): the tiny preset's
# 16-wide heads would be padded to 128 lanes and say nothing about the planner.
RUN = """
model: {preset: tiny, hidden_size: 256, intermediate_size: 512, num_heads: 2, num_kv_heads: 1, head_dim: 128,
        dtype: bfloat16, remat_policy: full, attention_chunk: 32, attention_kernel: jnp}
mesh: {data: 1, fsdp: 1, tensor: 1, sequence: 4}
stages:
  - {name: short, seq_len: 256, steps: 1, batch_size: 2}
loss_chunk: 64
"""


@pytest.fixture(scope="module")
def libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail('libtpu is not installed: `make test` installs it (pip install "jax[tpu]==<your jax version>").')


@pytest.fixture
def run_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    return str(path)


def test_compiles_the_train_step_for_v5p(libtpu, run_config, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = compile_cmd.main(["--config", run_config, "--topology", "v5p-8", "--json", str(out), "--set",
                             "model.context_parallel=ring"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    (row,) = json.loads(out.read_text())
    assert row["stage"] == "short" and row["topology"] == "v5p-8" and row["devices"] == 4
    assert row["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 4}
    assert row["attention_impl"] == "ring" and row["kernel"] == "jnp"
    assert row["xla_bytes_per_device"] > 0 and row["planner_bytes_per_device"] > 0
    assert 0.5 < row["planner_bytes_per_device"] / row["xla_bytes_per_device"] < 2.0
    assert row["fits"] is True and row["hbm_bytes"] == 95 * 2**30
    assert row["compile_s"] > 0
    printed = capsys.readouterr().out
    assert "planner / XLA" in printed and "fits" in printed


def test_the_mosaic_tpu_kernels_compile_in_every_strategy(libtpu, run_config, tmp_path, capsys):
    """kernel auto picks the Mosaic TPU Pallas kernels for the target (not the CPU host), and each
    context-parallel strategy's train step compiles with them."""
    for strategy in ("ring", "allgather", "hybrid"):  # 2 query heads: Ulysses needs hybrid's group of 2
        out = tmp_path / f"{strategy}.json"
        code = compile_cmd.main(["--config", run_config, "--topology", "v5p-8", "--json", str(out), "--set",
                                 "model.attention_kernel=auto", "--set", f"model.context_parallel={strategy}",
                                 "--set", "model.ulysses_size=2"])  # fmt: skip
        assert code == 0, capsys.readouterr()
        (row,) = json.loads(out.read_text())
        assert row["attention_impl"] == strategy and row["kernel"] == "mosaic_tpu" and row["fits"] is True
    # No sequence axis (fsdp=4): the Pallas call runs per device under shard_map, not through XLA's
    # automatic partitioner (which cannot split a Mosaic kernel).
    out = tmp_path / "blockwise.json"
    code = compile_cmd.main(["--config", run_config, "--topology", "v5p-8", "--json", str(out), "--set",
                             "model.attention_kernel=auto", "--set", "mesh.fsdp=4", "--set", "mesh.sequence=1",
                             "--set", "stages.0.batch_size=4", "--set", "stages.0.seq_len=2048"])  # fmt: skip
    assert code == 0, capsys.readouterr()
    (row,) = json.loads(out.read_text())
    assert row["attention_impl"] == "blockwise" and row["kernel"] == "mosaic_tpu"


def test_a_stage_that_does_not_compile_exits_1(libtpu, run_config, tmp_path, capsys):
    # The Triton-layout Pallas kernel cannot lower for TPU: reported as a result row, not raised.
    code = compile_cmd.main(["--config", run_config, "--topology", "v5p-8", "--set", "model.attention_kernel=triton"])
    assert code == 1
    assert "DOES NOT COMPILE" in capsys.readouterr().out


def test_bad_topology_exits_2_with_one_sentence_and_no_json(run_config, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert compile_cmd.main(["--config", run_config, "--topology", "v5q-8", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown topology 'v5q-8'") and "v5p-128" in err and err.count("\n") == 0
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "run.yaml"]


def test_a_mesh_the_slice_cannot_hold_exits_2(libtpu, run_config, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = compile_cmd.main(["--config", run_config, "--topology", "v5p-16", "--json", str(out)])
    assert code == 2
    assert "needs 4 devices but 8 are available" in capsys.readouterr().err
    assert not out.exists()


def test_h100_lowers_for_cuda_and_lists_the_kernels(run_config, tmp_path):
    out = tmp_path / "rows.json"
    code = compile_cmd.main(["--config", run_config, "--topology", "h100", "--set", "model.attention_kernel=auto",
                             "--json", str(out)])  # fmt: skip
    assert code == 0
    (row,) = json.loads(out.read_text())
    assert row["platform"] == "gpu" and row["kernel"] == "mosaic_gpu" and row["xla_bytes_per_device"] is None
    assert row["custom_calls"].get("mosaic_gpu_v2", 0) >= 3  # forward, dq and dk/dv, lowered by Mosaic GPU
    assert "__gpu$xla.gpu.triton" not in row["custom_calls"]


def test_topology_table():
    assert topology.target("v5p-8").chips == 4 and topology.target("v5p-1024").chips == 512
    assert topology.target("v5e-8").chips == 8 and topology.target("v6e-256").hbm_bytes == 32 * 2**30
    assert topology.target("H100").compute_capability == 9.0
    with pytest.raises(topology.TopologyError, match="unknown topology"):
        topology.target("tpu-9000")
