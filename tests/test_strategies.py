"""Every context-parallel strategy (ring, allgather, ulysses, hybrid) against dense fp32 reference attention.

Each case lays tokens, positions and segment ids out for the mesh (`attention.layout`), runs
`sharded_attention` on the global arrays, brings the output back to natural order and compares
outputs, LSE and dq/dk/dv (under an output and an LSE cotangent) with `reference_attention` on
`make_mask`, all in one jitted program, at the ring's fp32 tolerances (out/LSE ≤ 1e-5, grads ≤ 1e-4).

The full product of the factors is too slow for the suite, so `CASES` is a covering set: each of
allgather, ulysses and hybrid meets every layout (contiguous, zigzag, striped), both GQA ratios
(8/2 = 4:1 and 12/3 = 3:1), packed documents that cross shards and one document, and each sequence
size it can run on (2, 4, 8; hybrid at 2 groups × 4 and 4 groups × 2 on 8 devices, and 2 × 2 on 4:
a hybrid needs at least 2 groups of 2). The ring has its own pairwise suite (tests/test_ring.py) and
runs here once. Per strategy one case runs on data=2 × sequence=4 with *no* logical-axis rules
installed, so the default mapping (batch → data) shards the batch; one Ulysses case also has the
heads on tensor=2.

Besides: Ulysses with fewer kv heads than devices (the per-device kv heads are checked by spying on
the driver), clear errors when the query heads do not divide a Ulysses group, installed rules
winning over the default mapping, the default mapping equal to the rules table, and causal
skipping of chunk pairs and hops (allgather, ulysses, hybrid) against counts derived from the
positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import AttentionError, attention, instrument
from attention import strategies as strategies_module
from attention.layout import from_layout, layout_positions, to_layout
from attention.masks import make_mask
from attention.reference import reference_attention
from attention.strategies import DEFAULT_RULES, RingError, sharded_attention, ulysses_heads
from sharding import MeshConfig, axis_rules, flax_rules, make_mesh
from sharding.rules import ACTIVATION_RULES

HEAD_DIM = 16
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def _mesh(data=1, tensor=1, sequence=1):
    n = data * tensor * sequence
    return make_mesh(MeshConfig(data=data, fsdp=1, tensor=tensor, sequence=sequence), devices=jax.devices()[:n])


def _inputs(seed, b, length, heads, kv_heads):
    # numpy inputs: no eager jax ops, so each case compiles exactly one program.
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q = normal(b, length, heads, HEAD_DIM)
    k, v = normal(b, length, kv_heads, HEAD_DIM), normal(b, length, kv_heads, HEAD_DIM)
    return q, k, v, normal(b, length, heads, HEAD_DIM), normal(b, length, heads)


def _documents(b, length):
    # Boundaries at 5/13/27/45/... and 3/19/37/...: not multiples of any shard or zigzag chunk size
    # used here, so documents cross shards in every layout.
    pos = np.arange(length)
    rows = [
        np.searchsorted([5, 13, 27, 45, 70], pos, side="right"),
        np.searchsorted([3, 19, 37, 60], pos, side="right"),
    ]
    return np.stack([rows[i % 2] for i in range(b)]).astype(np.int32)


def _run(fn, reference, q, k, v, d_out, d_lse):
    """(out, lse, grads) of ``sum(out·d_out) + sum(lse·d_lse)`` for ``fn`` and ``reference``, one jit, as numpy."""

    def results(fn, q, k, v):
        def loss(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * d_out) + jnp.sum(lse * d_lse), (out, lse)

        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, lse, grads

    got, want = jax.jit(lambda q, k, v: (results(fn, q, k, v), results(reference, q, k, v)))(q, k, v)
    return jax.tree.map(np.asarray, (got, want))


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _assert_close(got, want):
    (out, lse, grads), (out_r, lse_r, grads_r) = got, want
    assert out.shape == out_r.shape and lse.shape == lse_r.shape
    assert _max_diff(out, out_r) <= OUT_TOL
    assert _max_diff(lse, lse_r) <= OUT_TOL
    for g, g_r in zip(grads, grads_r, strict=True):
        assert g.shape == g_r.shape
        assert _max_diff(g, g_r) <= GRAD_TOL
    # Not vacuous: every gradient being compared is far from zero.
    assert min(float(np.max(np.abs(g))) for g in grads_r) > 1e-2


def _strategy_vs_reference(
    strategy, mesh, layout, heads, kv_heads, packed, *, ulysses_size=None, causal=True, length=32, chunk=4, seed=0
):
    sizes = dict(mesh.shape)
    ring, b = sizes["sequence"], 2 * sizes["data"]
    q, k, v, d_out, d_lse = _inputs(seed, b, length, heads, kv_heads)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    seg = _documents(b, length) if packed else None
    lay = lambda x: None if x is None else to_layout(x, ring, layout)  # noqa: E731

    def ours(q, k, v):
        out, lse = sharded_attention(
            lay(q),
            lay(k),
            lay(v),
            mesh=mesh,
            strategy=strategy,
            ulysses_size=ulysses_size,
            causal=causal,
            q_positions=lay(pos),
            kv_positions=lay(pos),
            q_segment_ids=lay(seg),
            kv_segment_ids=lay(seg),
            chunk_size=chunk,
            return_lse=True,
        )
        return from_layout(out, ring, layout), from_layout(lse, ring, layout)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, seg, seg, causal), HEAD_DIM**-0.5)

    return _run(ours, reference, q, k, v, d_out, d_lse)


# (strategy, ulysses_size, mesh (data, tensor, sequence), layout, (heads, kv heads), packed, causal, length, rules)
# rules "none": called with no logical-axis rules installed (the default mapping, batch over data=2).
CASES = [
    ("ring", None, (2, 1, 4), "contiguous", (8, 2), True, True, 32, "none"),
    ("allgather", None, (1, 1, 2), "contiguous", (12, 3), True, True, 32, "table"),
    ("allgather", None, (2, 1, 4), "zigzag", (8, 2), True, True, 48, "none"),
    ("allgather", None, (1, 1, 8), "striped", (12, 3), False, False, 64, "table"),
    ("ulysses", None, (1, 1, 2), "striped", (8, 2), True, True, 32, "table"),
    ("ulysses", None, (2, 1, 4), "contiguous", (12, 3), True, True, 64, "none"),
    ("ulysses", None, (1, 2, 4), "zigzag", (8, 2), False, False, 32, "table"),  # heads on tensor=2 too
    ("ulysses", None, (1, 1, 8), "zigzag", (8, 2), True, True, 64, "table"),
    ("hybrid", 4, (1, 1, 8), "zigzag", (8, 2), True, True, 64, "table"),  # 2 groups × 4
    ("hybrid", 2, (1, 1, 8), "striped", (12, 3), True, True, 64, "table"),  # 4 groups × 2
    ("hybrid", 2, (2, 1, 4), "contiguous", (12, 3), False, True, 32, "none"),  # 2 groups × 2
]


def _case_id(case):
    strategy, u, (d, t, s), layout, (n, kh), packed, causal, length, rules = case
    group = f"x{u}" if u else ""
    docs, mask = ("docs" if packed else "1doc"), ("causal" if causal else "bidir")
    return f"{strategy}{group}-d{d}t{t}s{s}-{layout}-{n}/{kh}-{docs}-{mask}-L{length}-{rules}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_strategy_matches_reference(case, monkeypatch):
    strategy, ulysses_size, (data, tensor, seq), layout, (heads, kv_heads), packed, causal, length, rules = case
    mesh = _mesh(data, tensor, seq)
    calls = []
    real_attend = strategies_module.attend

    def spy(cfg, q, k, *args):
        calls.append((cfg.mode, cfg.stride, q.shape, k.shape))
        return real_attend(cfg, q, k, *args)

    monkeypatch.setattr(strategies_module, "attend", spy)
    installed = nn.logical_axis_rules(()) if rules == "none" else axis_rules(mesh)
    with installed:
        got, want = _strategy_vs_reference(
            strategy, mesh, layout, heads, kv_heads, packed, ulysses_size=ulysses_size, causal=causal, length=length
        )
    _assert_close(got, want)

    # What each device's driver call saw: the strategy really ran as named.
    (mode, stride, q_shape, k_shape) = calls[0]
    b_local = 2  # 2·data rows over data
    heads_local = heads // tensor if heads % tensor == 0 else heads
    kv_local = kv_heads // tensor if kv_heads % tensor == 0 and heads % tensor == 0 else kv_heads
    if strategy in ("ring", "allgather"):
        assert (mode, stride) == (("ring" if strategy == "ring" else "gather"), 1)
        assert q_shape == (b_local, length // seq, heads_local, HEAD_DIM)
        assert k_shape[2] == kv_local
    else:
        group = seq if strategy == "ulysses" else ulysses_size
        assert (mode, stride) == (("local", 1) if group == seq else ("ring", group))
        # Whole-group sequence and 1/group of the heads after the all-to-all ...
        assert q_shape == (b_local, length // seq * group, heads_local // group, HEAD_DIM)
        # ... and kv heads replicated only as far as whole GQA groups per device need.
        assert k_shape[2] == _fewest_kv_heads(heads_local, kv_local, group) // group


def _fewest_kv_heads(n, kh, group):
    """Brute force: the fewest kv heads kh·r (r copies of each) that split evenly over ``group`` devices
    into whole GQA groups of the n / group query heads each device holds."""
    return next(kh * r for r in range(1, n + 1) if (kh * r) % group == 0 and n % (kh * r) == 0)


def test_ulysses_heads_replicates_only_as_needed():
    for n in range(1, 33):
        for kh in (d for d in range(1, n + 1) if n % d == 0):
            for group in (1, 2, 4, 8):
                if n % group:
                    with pytest.raises(RingError, match=f"query heads \\({n}\\) divisible by {group}"):
                        ulysses_heads(n, kh, group)
                else:
                    assert ulysses_heads(n, kh, group) == _fewest_kv_heads(n, kh, group)
    assert ulysses_heads(8, 2, 8) == 8  # kv 2 < 8 devices: one copy each, 1 kv head per device
    assert ulysses_heads(8, 2, 4) == 4  # each device: 2 query heads of one GQA group, 1 kv head
    assert ulysses_heads(8, 2, 2) == 2  # no copies: each device one whole kv group


def test_heads_that_do_not_divide_the_group_fail_clearly():
    q = np.zeros((1, 32, 12, HEAD_DIM), np.float32)
    kv = np.zeros((1, 32, 3, HEAD_DIM), np.float32)
    mesh = _mesh(sequence=8)
    with axis_rules(mesh):
        with pytest.raises(RingError, match=r"Ulysses over 8 devices needs the query heads \(12\) divisible by 8"):
            sharded_attention(q, kv, kv, mesh=mesh, strategy="ulysses")
        with pytest.raises(AttentionError, match=r"query heads \(12\) divisible by 8"):
            attention(q, kv, kv, impl="ulysses", mesh=mesh)
        with pytest.raises(RingError, match="ulysses_size 3 must divide the 8 devices"):
            sharded_attention(q, kv, kv, mesh=mesh, strategy="hybrid", ulysses_size=3)
        with pytest.raises(RingError, match="unknown context-parallel strategy 'tree'"):
            sharded_attention(q, kv, kv, mesh=mesh, strategy="tree")


def test_default_rules_are_the_activation_rules():
    for name, axes in DEFAULT_RULES.items():
        assert axes == ACTIVATION_RULES[name], name
    assert set(DEFAULT_RULES) == {"batch", "length", "heads", "kv_heads", "head_dim"}


@pytest.mark.parametrize("strategy", ["allgather", "ulysses", "hybrid"])
def test_no_rules_means_the_default_mapping(strategy):
    """Batch 3 on data=2: the default mapping shards the batch over data, which 3 does not divide."""
    mesh = _mesh(data=2, sequence=4)
    q = np.zeros((3, 32, 8, HEAD_DIM), np.float32)
    kv = np.zeros((3, 32, 2, HEAD_DIM), np.float32)
    with nn.logical_axis_rules(()):
        with pytest.raises(RingError, match="batch 3 is not divisible by the 2 data×fsdp shards"):
            sharded_attention(q, kv, kv, mesh=mesh, strategy=strategy, ulysses_size=2)


def test_installed_rules_win_over_the_default_mapping():
    """Rules that leave the batch unsharded: batch 3 on data=2 runs (Ulysses) and matches the reference."""
    mesh = _mesh(data=2, sequence=4)
    length = 32
    q, k, v, d_out, d_lse = _inputs(4, 3, length, 8, 2)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (3, length)).copy()

    def ours(q, k, v):
        return sharded_attention(q, k, v, mesh=mesh, strategy="ulysses", chunk_size=4, return_lse=True)

    def reference(q, k, v):
        return reference_attention(q, k, v, make_mask(pos, pos, None, None, True), HEAD_DIM**-0.5)

    no_batch = tuple((name, None if name == "batch" else axes) for name, axes in flax_rules(mesh))
    with nn.logical_axis_rules(no_batch):
        got, want = _run(ours, reference, q, k, v, d_out, d_lse)
    _assert_close(got, want)


# --- causal skipping: executed chunk pairs and hops, from `attention.instrument`, against counts derived
# from the positions each device's kernel sees (chunks of CHUNK consecutive slots; a pair is visible when
# its earliest key is not after its latest query).

CHUNK = 4


def _visible_pairs(q_pos, k_pos, chunk=CHUNK):
    qc, kc = np.reshape(q_pos, (-1, chunk)), np.reshape(k_pos, (-1, chunk))
    return int(np.sum(kc.min(axis=1)[None, :] <= qc.max(axis=1)[:, None]))


def _work(strategy, seq, layout, length, skip=True, ulysses_size=None, heads=8, kv_heads=2):
    mesh = _mesh(sequence=seq)
    q, k, v, d_out, _ = _inputs(1, 1, length, heads, kv_heads)
    pos = np.asarray(layout_positions(1, length, seq, layout))

    def loss(q, k, v):
        out = sharded_attention(
            q,
            k,
            v,
            mesh=mesh,
            strategy=strategy,
            ulysses_size=ulysses_size,
            q_positions=pos,
            kv_positions=pos,
            chunk_size=CHUNK,
            skip_masked=skip,
            counter=counts,
        )
        return jnp.sum(out * d_out)

    with axis_rules(mesh), instrument.count_work() as counts:
        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
        jax.effects_barrier()
        counts = dict(counts)
    per = {kind: [counts.get((kind, r), 0) for r in range(seq)] for kind in ("hop_fwd", "chunk_fwd", "chunk_bwd")}
    assert per["chunk_fwd"] == per["chunk_bwd"]  # the backward skips exactly what the forward skipped
    return per, pos[0]


def test_allgather_skips_causally_hidden_chunk_pairs():
    seq, length = 4, 32
    full, _ = _work("allgather", seq, "zigzag", length, skip=False)
    assert full["chunk_fwd"] == [(length // seq // CHUNK) * (length // CHUNK)] * seq  # 2 × 8: every pair
    zigzag, pos = _work("allgather", seq, "zigzag", length)
    shards = np.reshape(pos, (seq, -1))
    want = [_visible_pairs(shards[r], pos) for r in range(seq)]
    assert zigzag["chunk_fwd"] == want == [9, 9, 9, 9]  # balanced, and 9 of 16 pairs
    assert zigzag["hop_fwd"] == [0] * seq  # one gather, no ring hops


def test_ulysses_skips_causally_hidden_chunk_pairs():
    seq, length = 4, 32
    counts, pos = _work("ulysses", seq, "zigzag", length)
    # After the all-to-all every device holds the whole sequence (in layout order) for 2 of the 8 heads;
    # the local kernel runs off the ring, so all devices count at index 0.
    per_device = _visible_pairs(pos, pos)
    assert per_device == 36 < (length // CHUNK) ** 2
    assert counts["chunk_fwd"] == [seq * per_device, 0, 0, 0]


def test_hybrid_skips_hops_across_groups():
    """Contiguous, 2 groups × 4: group 0 holds the first half of the sequence, so its ring hop to group 1's
    (future) keys is skipped; group 1 runs both hops."""
    seq, group, length = 8, 4, 64
    counts, pos = _work("hybrid", seq, "contiguous", length, ulysses_size=group)
    assert counts["hop_fwd"] == [1] * group + [2] * group
    halves = np.reshape(pos, (seq // group, -1))  # each group's tokens, as its devices hold them after the all-to-all
    first = _visible_pairs(halves[0], halves[0])
    second = _visible_pairs(halves[1], halves[1]) + _visible_pairs(halves[1], halves[0])
    assert (first, second) == (36, 100)
    assert counts["chunk_fwd"] == [first] * group + [second] * group
