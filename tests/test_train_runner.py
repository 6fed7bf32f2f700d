"""The curriculum runner end to end on the emulated 8-device mesh (data=2 × sequence=4, zigzag ring).

One uninterrupted two-stage run (32 → 64 tokens, θ from the critical rule) is the reference for:
the stage transition (θ, length and max positions change; the stage-2 params start exactly where
stage 1 ended), the final config carrying the new θ, kill-and-resume through the CLI reproducing
the loss sequence bit for bit, and a 2-process × 4-device localhost run matching it. A third
run drives the loss to NaN and must stop naming the step and keep the last good checkpoint.
"""

import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from engine_fixtures import persistent_compile_cache

import convert
import model
from train import cli
from train.checkpoint import Checkpointer
from train.config import from_dict, validate
from train.curriculum import run
from train.data import make_iterator
from train.metrics import read_metrics
from train.stage import build_stage, move_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAW = {
    "model": {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
              "head_dim": 8, "max_position_embeddings": 32, "rope": {"theta": 500.0}},
    "data": {"sources": [{"kind": "synthetic", "task": "prose"}]},
    "mesh": {"data": 2, "fsdp": 1, "tensor": 1, "sequence": 4},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "stages": [
        {"name": "short", "seq_len": 32, "steps": 3, "batch_size": 4},
        {"name": "long", "seq_len": 64, "steps": 3, "batch_size": 2, "theta_rule": "critical", "lr": 1e-3},
    ],
    "checkpoint": {"every": 0, "keep": 3, "async_save": True},
    "eval": {"heldout_batches": 1},
    "loss_chunk": 32,
    "progress": False,
    "tensorboard": False,
}  # fmt: skip
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the CLI re-runs compile the same programs as the reference."""
    with persistent_compile_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: (run_dir, result)."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    result = run(from_dict(RAW), run_dir=run_dir, say=lambda *a: None)
    return run_dir, result


def test_stage_transition_changes_theta_and_length_and_keeps_params(reference):
    run_dir, result = reference
    cfg = from_dict(RAW)
    plans = validate(cfg, jax.device_count())
    theta2 = model.theta_for_length(64, 500.0, 32, head_dim=8, rule="critical")
    records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {(r["stage"], r["seq_len"], r["theta"]) for r in records} == {("short", 32, 500.0), ("long", 64, theta2)}
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "grad_norm", "lr", "tokens_per_sec", "mfu"))

    # Each stage runs its own warmup + cosine over its own 3 steps (state.step restarts at 0), by hand:
    # lr·(step + 1)/warmup while step < warmup (= 1), then floor + (lr − floor)·½(1 + cos(π·(step − 1)/2)),
    # floor = 0.1·lr. Stage 2's first step is its warmup start at its own peak 1e-3, not stage 1's
    # continuation (which would sit at the floor 3e-4) nor 1e-3's floor; the peak holds at step 1 and
    # step 2 is the cosine midpoint of stage 2's own horizon.
    def by_hand(lr, step, warmup=1, total=3, floor_ratio=0.1):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
        return lr * floor_ratio + (lr - lr * floor_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    want = [by_hand(3e-3, s) for s in range(3)] + [by_hand(1e-3, s) for s in range(3)]
    assert want[3:] == pytest.approx([1e-3, 1e-3, 5.5e-4], rel=1e-12)
    np.testing.assert_allclose([r["lr"] for r in records], want, rtol=1e-6)

    # The final config (ringllama checkpoint and report) carries the new θ and max positions.
    final = convert.read_config(os.path.join(run_dir, "final"))
    assert math.isclose(final.rope.theta, theta2, rel_tol=1e-12) and final.max_position_embeddings == 64
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert set(report["stages"]) == {"short", "long"}
    assert set(report["stages"]["short"]["perplexity"]) == {"32", "64"}  # its own length and the next
    assert math.isfinite(report["stages"]["long"]["perplexity"]["64"])
    assert os.path.isfile(os.path.join(run_dir, "loss.png"))

    # Params carry over: stage 2's first recorded loss is the stage-1 params' loss on stage 2's first
    # batch under stage 2's θ — computed here independently from the stage-1 checkpoint.
    mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "tensor", "sequence"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)  # fmt: skip
    short, long = (build_stage(cfg, plans, p, with_data=False, mesh=mesh) for p in plans)
    with Checkpointer(os.path.join(run_dir, "checkpoints"), read_only=True) as ck:
        state, meta = ck.restore(3, short.engine.restore_target)
    assert meta["stage_name"] == "short" and meta["model"]["rope"]["theta"] == 500.0
    moved = move_state(state, long, say=lambda *a: None)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), state.params, moved.params)
    assert all(jax.tree.leaves(same)) and int(moved.step) == 0
    batch = next(make_iterator(plans[1].data, 64, 2, 0 * 1009 + 1, layout="zigzag", num_shards=4))
    loss_sum, count = long.engine.eval_step(moved.params, batch)
    np.testing.assert_allclose(float(loss_sum) / float(count), records[3]["loss"], rtol=1e-6)


def test_kill_and_resume_through_the_cli_reproduces_the_losses(reference, tmp_path, capsys):
    ref_dir, _ = reference
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RAW))
    run_dir = str(tmp_path / "run")
    args = ["--config", str(config), "--run-dir", run_dir]
    assert cli.main([*args, "--stop-after", "4"]) == 0  # "killed" one step into stage 2
    assert len(_losses(run_dir)) == 4 and not os.path.exists(os.path.join(run_dir, "final"))
    assert cli.main([*args, "--resume"]) == 0
    assert _losses(run_dir) == _losses(ref_dir)  # bit for bit
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert set(report["stages"]) == {"short", "long"} and report["global_step"] == STEPS


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    raw = dict(RAW, optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": 0.0}, stages=[RAW["stages"][0]])
    raw["checkpoint"] = {"every": 1, "keep": 5, "async_save": True}
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    assert cli.main(["--config", str(config), "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "is not finite at step 2" in err and "last good checkpoint is step 1" in err
    with Checkpointer(run_dir / "checkpoints", read_only=True) as ck:
        assert ck.all_steps() == [1]
        assert ck.read_meta(1)["global_step"] == 1
    assert not (run_dir / "final").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(400)
def test_two_processes_of_four_devices_match_one_process_of_eight(reference, tmp_path):
    ref_dir, _ = reference
    # Stage 1 only and no held-out evals: the two ranks compile just the init and the train step.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(dict(RAW, stages=RAW["stages"][:1], eval={"heldout_batches": 0})))
    run_dir, port = str(tmp_path / "mh"), _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=REPO)  # fmt: skip
    logs = [tmp_path / f"process{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a rank
    base = [sys.executable, "-m", "train", "--config", str(config), "--run-dir", run_dir]
    base += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as out:
            cmd = [*base, "--process-id", str(i)]
            procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=360)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    # Same global batches and params; only the cross-process all-reduce order differs.
    steps = RAW["stages"][0]["steps"]
    assert len(_losses(run_dir)) == steps
    np.testing.assert_allclose(_losses(run_dir), _losses(ref_dir)[:steps], rtol=1e-5, atol=0)
