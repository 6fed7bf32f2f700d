"""Checkpoints: kill-and-resume reproduces the loss sequence bitwise, restore onto another mesh,
a save killed mid-write leaves the previous checkpoint in charge, keep-N and clear errors."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import engine_for, fresh_state, iterator, mesh_for, num_shards, rel_err, step_for

from train.checkpoint import Checkpointer, CheckpointError

N, K = 4, 2  # steps in all; the save happens after step K
RUN = "fsdp"  # fsdp=2 × tensor=2 × sequence=2, 2 micro-batches: the most sharded state


@functools.cache
def _straight_run():
    """N uninterrupted steps: the loss sequence, the state after step K and after step N (host copies)."""
    it, state, step = iterator(num_shards(RUN)), fresh_state(RUN), step_for(RUN)
    losses, snaps = [], {}
    for i in range(1, N + 1):
        state, metrics = step(state, next(it))
        losses.append(float(metrics["loss"]))
        if i in (K, N):
            snaps[i] = jax.device_get(state)
    return losses, snaps


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """A run that saves after step K (async), keeps training while the save is written, then 'dies'."""
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    it, state, step = iterator(num_shards(RUN)), fresh_state(RUN), step_for(RUN)
    ck = Checkpointer(directory, keep=2, async_save=True)
    losses = []
    for i in range(1, N + 1):
        state, metrics = step(state, next(it))  # donates the state the pending save was given
        losses.append(float(metrics["loss"]))
        if i == K:
            key = jax.random.key(1234)
            meta = {"stage": 0, "step": K, "data": it.state(), "rng": jax.random.key_data(key).tolist()}
            ck.save(K, state, meta)
    ck.wait()
    del state, it, ck  # nothing of this process's state survives except the directory
    return directory, losses


def test_kill_and_resume_reproduces_the_loss_sequence_bitwise(interrupted_run):
    directory, losses_before_kill = interrupted_run
    straight, snaps = _straight_run()
    assert losses_before_kill == straight  # the async save did not disturb the run that kept going

    ck = Checkpointer(directory)
    assert ck.latest_step() == K
    state, meta = ck.restore(None, engine_for(RUN).restore_target)
    assert meta["stage"] == 0 and meta["step"] == K
    assert meta["rng"] == jax.random.key_data(jax.random.key(1234)).tolist()
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(snaps[K]), strict=True):
        np.testing.assert_array_equal(a, b)

    it = iterator(num_shards(RUN))
    it.restore(meta["data"])
    resumed = losses_before_kill[:K]
    for _ in range(K, N):
        state, metrics = step_for(RUN)(state, next(it))
        resumed.append(float(metrics["loss"]))
    assert resumed == straight  # bitwise, not approximately
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(snaps[N]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_restore_onto_another_mesh_shape_and_continue(interrupted_run):
    """Written on fsdp=2 × tensor=2 × sequence=2, read onto data=2 × sequence=4 (zigzag over 4 shards)."""
    directory, _ = interrupted_run
    straight, snaps = _straight_run()
    target = engine_for("ring").restore_target
    state, meta = Checkpointer(directory, read_only=True).restore(K, target)
    for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding == want.sharding and leaf.sharding.mesh == mesh_for("ring")
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(snaps[K]), strict=True):
        np.testing.assert_array_equal(a, b)

    it = iterator(num_shards("ring"))  # same documents, another ring layout
    it.restore(meta["data"])
    for i in range(K, N):
        state, metrics = step_for("ring")(state, next(it))
        np.testing.assert_allclose(float(metrics["loss"]), straight[i], rtol=1e-5)
    assert rel_err(jax.device_get(state.params), snaps[N].params) <= 1e-5


_CRASH = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    import orbax.checkpoint._src.path.atomicity as atomicity
    from train.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1], keep=3, async_save=True)
    ck.save(1, {"w": jnp.arange(6.0)}, {"step": 1})
    ck.wait()

    async def die_before_commit(self):  # everything is written; the process dies before the rename
        os._exit(17)

    atomicity.AtomicRenameTemporaryPath.finalize = die_before_commit
    ck.save(2, {"w": jnp.arange(6.0) * 2}, {"step": 2})
    ck.wait()
    print("the save was not interrupted")
    """
)


def test_save_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(directory)], capture_output=True, text=True, env=env)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    leftovers = [p for p in os.listdir(directory) if p.startswith("2") and "tmp" in p]
    assert leftovers, os.listdir(directory)  # step 2 really was half-written

    target = {
        "w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    }
    ck = Checkpointer(directory)
    assert ck.latest_step() == 1 and ck.all_steps() == [1]
    state, meta = ck.restore(None, target)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(6.0))
    assert meta == {"step": 1}
    # The debris is cleaned up and step 2 can be written again.
    ck.save(2, {"w": jnp.arange(6.0) * 3}, {"step": 2})
    ck.wait()
    assert ck.latest_step() == 2 and not [p for p in os.listdir(directory) if "tmp" in p]
    np.testing.assert_array_equal(np.asarray(ck.restore(2, target)[0]["w"]), np.arange(6.0) * 3)
    ck.close()


def test_keep_n_and_clear_errors(tmp_path):
    tree = {"w": jnp.arange(4.0)}
    target = {
        "w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    }
    with Checkpointer(tmp_path / "ck", keep=2, async_save=False) as ck:
        for s in (1, 2, 3, 4):
            ck.save(s, jax.tree.map(lambda x, s=s: x * s, tree), {"step": s})
        assert ck.all_steps() == [3, 4] and ck.latest_step() == 4
        assert ck.read_meta() == {"step": 4}
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 1 .*available steps: \[3, 4\]"):
            ck.restore(1, target)
        wrong = {"w": jax.ShapeDtypeStruct((5,), jnp.float32, sharding=target["w"].sharding)}
        with pytest.raises(CheckpointError, match="does not match the model/optimizer"):
            ck.restore(4, wrong)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        Checkpointer(tmp_path / "empty").restore(None, target)
    with pytest.raises(CheckpointError, match="no checkpoint directory at"):
        Checkpointer(tmp_path / "missing", read_only=True)
