"""Names a reader meets in profiles and checkpoints.

Every matmul of a decoder layer sits under the ``attention`` or ``mlp`` named scope (read from the
lowered program's op locations, scanned and unrolled layers); the RMSNorm modules keep the parameter
paths conversions map (``input_norm/scale``, ``post_attn_norm/scale``, ``norm/scale``).
"""

import re

import jax
import jax.numpy as jnp
import pytest

import model


def _shapes(cfg):
    """The parameter tree with plain `jax.ShapeDtypeStruct` leaves (the boxes' values)."""
    return jax.tree.map(lambda b: b.value, model.abstract_params(cfg), is_leaf=lambda x: hasattr(x, "names"))


@pytest.mark.parametrize("scan", [True, False])
def test_layer_matmuls_sit_under_attention_and_mlp_scopes(scan):
    cfg = model.preset("tiny", scan_layers=scan)
    params = _shapes(cfg)
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    text = jax.jit(lambda p, t: model.Llama(cfg).apply({"params": p}, t)).lower(params, tokens).as_text(debug_info=True)
    dots = set(re.findall(r'loc\("([^"]*/dot_general)"', text))
    head = {d for d in dots if "btd,dv->btv" in d}
    in_layers = dots - head
    assert len(head) == 1 and in_layers
    attn = {d for d in in_layers if "/attention/" in d}
    mlp = {d for d in in_layers if "/mlp/" in d}
    assert attn | mlp == in_layers and not attn & mlp
    # q, k, v, o projections plus the two attention einsums; gate/up share one spelling, then down.
    assert {re.search(r"/([^/]+)/dot_general$", d)[1] for d in attn} >= {"btd,dnh->btnh", "btnh,nhd->btd"}
    assert {re.search(r"/([^/]+)/dot_general$", d)[1] for d in mlp} == {"btd,df->btf", "btf,fd->btd"}


def test_rms_norm_parameter_paths_are_unchanged():
    cfg = model.preset("tiny", scan_layers=False)
    params = _shapes(cfg)
    paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    norms = {p for p in paths if "norm" in p}
    expected = {"norm/scale"} | {
        f"layers_{i}/{n}/scale" for i in range(cfg.num_layers) for n in ("input_norm", "post_attn_norm")
    }
    assert norms == expected
