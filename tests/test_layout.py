"""Ring layouts: exact inverse moves, the documented token placement, clear errors for bad lengths."""

import jax.numpy as jnp
import numpy as np
import pytest

from attention.layout import (
    LAYOUTS,
    LayoutError,
    check_layout,
    from_layout,
    from_layout_tree,
    layout_permutation,
    layout_positions,
    to_layout,
    to_layout_tree,
)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shards", [1, 2, 4, 8])
def test_layouts_are_exact_inverses(layout, shards):
    rng = np.random.default_rng(shards)
    x = rng.standard_normal((2, 16 * shards, 3, 2)).astype(np.float32)
    y = to_layout(x, shards, layout)
    assert isinstance(y, np.ndarray) and y.shape == x.shape
    np.testing.assert_array_equal(from_layout(y, shards, layout), x)
    # jax arrays, another axis, and the explicit permutation all agree.
    xj = jnp.asarray(x)
    np.testing.assert_array_equal(np.asarray(from_layout(to_layout(xj, shards, layout), shards, layout)), x)
    perm = layout_permutation(x.shape[1], shards, layout)
    np.testing.assert_array_equal(y, x[:, perm])
    assert sorted(perm.tolist()) == list(range(x.shape[1]))
    xt = np.swapaxes(x, 1, 2)
    np.testing.assert_array_equal(to_layout(xt, shards, layout, axis=2), np.swapaxes(y, 1, 2))


def test_zigzag_and_striped_placement():
    # 4 shards, 16 tokens: zigzag chunks of 2; shard r holds chunks r and 7 - r.
    zig = layout_permutation(16, 4, "zigzag").reshape(4, 4)
    assert zig.tolist() == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    striped = layout_permutation(16, 4, "striped").reshape(4, 4)
    assert striped.tolist() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    np.testing.assert_array_equal(layout_permutation(16, 4, "contiguous"), np.arange(16))
    pos = layout_positions(2, 16, 4, "zigzag")
    assert pos.dtype == jnp.int32 and pos.shape == (2, 16)
    np.testing.assert_array_equal(np.asarray(pos[1]), zig.reshape(-1))


def test_tree_moves_tokens_positions_and_segments_together():
    batch = {
        "tokens": np.arange(32, dtype=np.int32).reshape(2, 16) * 3,
        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
        "segment_ids": np.repeat(np.arange(4, dtype=np.int32), 4)[None].repeat(2, 0),
    }
    moved = to_layout_tree(batch, 4, "zigzag")
    perm = layout_permutation(16, 4, "zigzag")
    for name, value in batch.items():
        np.testing.assert_array_equal(moved[name], value[:, perm])
    back = from_layout_tree(moved, 4, "zigzag")
    for name, value in batch.items():
        np.testing.assert_array_equal(back[name], value)


@pytest.mark.parametrize(
    ("length", "shards", "layout", "needed"),
    [(36, 4, "zigzag", "multiple of 8"), (30, 4, "contiguous", "multiple of 4"), (10, 8, "striped", "multiple of 8")],
)
def test_lengths_that_do_not_fit_raise_clear_errors(length, shards, layout, needed):
    with pytest.raises(LayoutError, match=needed):
        check_layout(length, shards, layout)
    with pytest.raises(LayoutError, match=f"sequence length {length}"):
        to_layout(np.zeros((1, length)), shards, layout)
    with pytest.raises(LayoutError, match=f"sequence length {length}"):
        from_layout(jnp.zeros((1, length)), shards, layout)


def test_unknown_layout_is_rejected():
    with pytest.raises(LayoutError, match="unknown ring layout 'diagonal'"):
        check_layout(16, 4, "diagonal")
    check_layout(20, 4, "contiguous")  # fits: no error
    check_layout(20, 4, "striped")
    with pytest.raises(LayoutError):
        check_layout(20, 4, "zigzag")
