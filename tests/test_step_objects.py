"""The step objects (`train.step.CompiledStep`): the compile cache each step owns, one variant per batch
shape, the eval step at any length, and the named scopes a profile reads the train step by."""

import jax
import numpy as np
from engine_fixtures import CFG, LOSS_CHUNK, OPTIM, TOTAL_STEPS, mesh_for

from sharding.rules import batch_sharding
from train.stage import build_engine
from train.step import BATCH_KEYS


def _structs(mesh, b: int, t: int) -> dict:
    return {
        k: jax.ShapeDtypeStruct(
            (b, t), np.float32 if k == "loss_mask" else np.int32, sharding=batch_sharding(mesh, (b, t))
        )
        for k in BATCH_KEYS
    }


def test_steps_jit_once_per_batch_shape_and_name_the_loss_and_update():
    mesh = mesh_for("single")
    engine = build_engine(CFG, OPTIM, mesh, total_steps=TOTAL_STEPS, loss_chunk=LOSS_CHUNK)
    step = engine.train_step
    short, long = _structs(mesh, 2, 32), _structs(mesh, 2, 64)
    assert step.jitted(short) is step.jitted(short)
    assert step.jitted(long) is not step.jitted(short)
    assert len(step.compiled) == 2
    text = step.jitted(short).lower(engine.abstract, short).as_text(debug_info=True)
    # The forward under jvp(loss), the backward under its transpose, Adam and the finite-select by name.
    assert "/jvp(loss)/" in text and "/transpose(jvp(loss))/" in text and "/optimizer_update/" in text
    # One eval step serves every length: a loss chunk longer than the rows is one piece.
    params = engine.abstract.params
    for batch in (short, long, _structs(mesh, 2, 8)):
        loss_sum, count = engine.eval_step.jitted(batch).eval_shape(params, batch)
        assert loss_sum.shape == count.shape == ()
    assert len(engine.eval_step.compiled) == 3
