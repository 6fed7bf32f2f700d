"""Work counting is static kernel config: a trace with a counter and one without are separate jit cache
entries, so counts neither leak out of a `count_work` block nor go missing inside one."""

import jax
import numpy as np
import pytest

from attention import instrument
from attention.blockwise import blockwise_attention
from attention.pallas_flash import pallas_forward

SCALE = 16**-0.5
# Causal, 4 chunks/tiles of 8: 10 pairs on or below the diagonal, 4 of them on it (masked).
FWD = {"jnp": {("chunk_fwd", 0): 10, ("chunk_fwd_masked", 0): 4}, "pallas": {("tile_fwd", 0): 10}}


def _inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 32, 1, 16), np.float32)
    k, v = rng.standard_normal((2, 1, 32, 1, 16), np.float32)
    pos = np.arange(32, dtype=np.int32)[None]
    return q, k, v, pos, np.zeros_like(pos)


def _forward(kernel: str, counter):
    """A fresh jitted forward; the Pallas one calls the module-level jitted kernel directly."""
    if kernel == "jnp":
        return jax.jit(lambda q, k, v, pos, seg: blockwise_attention(q, k, v, chunk_size=8, counter=counter)[0])
    kw = dict(causal=True, scale=SCALE, block_q=8, block_k=8, counter=counter)
    return jax.jit(lambda q, k, v, pos, seg: pallas_forward(q, k, v, pos, pos, seg, seg, **kw)[0])


def _run(fn) -> None:
    jax.block_until_ready(fn(*_inputs()))
    jax.effects_barrier()


@pytest.mark.parametrize("kernel", ["jnp", "pallas"])
def test_counts_stop_when_the_block_ends(kernel):
    with instrument.count_work() as counts:
        counted = _forward(kernel, counts)
        _run(counted)
        assert dict(counts) == FWD[kernel]
    _run(counted)  # the cached, instrumented program runs again outside the block: it adds nothing
    assert dict(counts) == FWD[kernel]
    with instrument.count_work() as later:
        _run(counted)  # nor into a later block's counter
        _run(_forward(kernel, None))
    assert dict(later) == {} and dict(counts) == FWD[kernel]


@pytest.mark.parametrize("kernel", ["jnp", "pallas"])
def test_an_uncounted_trace_does_not_shadow_a_counted_one(kernel):
    _run(_forward(kernel, None))  # same shapes and settings, traced first without a counter
    with instrument.count_work() as counts:
        _run(_forward(kernel, counts))
        _run(_forward(kernel, counts))
    assert dict(counts) == {key: 2 * n for key, n in FWD[kernel].items()}
    _run(_forward(kernel, None))
    assert dict(counts) == {key: 2 * n for key, n in FWD[kernel].items()}


def test_counters_are_static_keys_by_identity():
    a, b = instrument.WorkCounter(), instrument.WorkCounter()
    assert a == a and a != b and hash(a) != hash(b)
