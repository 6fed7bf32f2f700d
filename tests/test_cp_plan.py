"""The context-parallel planner (`sharding.cp_plan`): per-strategy costs, feasibility and the pick.

Costs are checked against the formulas of the module docstring written out again here in float
arithmetic; the recommendation against the cases it must get right (free links → the ring; a
memory headroom the all-gather does not fit → not all-gather; heads Ulysses cannot split → not
Ulysses), and ``python -m sharding plan`` prints the table and exits 2 on a bad group size.
"""

import pytest

import model
from sharding import MeshConfig, make_mesh
from sharding.cli import main as sharding_main
from sharding.cp_plan import LINKS, Links, kernel_efficiency, plan_strategies, recommend, resolve_context_parallel

GiB = 2**30
KW = dict(seq_len=262144, batch_per_device=1, heads=32, kv_heads=8, head_dim=128, devices=16, elem_bytes=2)


def _by_name(plans):
    return {p.strategy: p for p in plans}


def test_costs_follow_the_formulas():
    links = Links(kernel_tflops=100.0, fast_gbytes=50.0, slow_gbytes=10.0, node_size=8)
    plans = _by_name(plan_strategies(**KW, links=links, remat=False))
    T, N, n, k, h, e = 262144, 16, 32, 8, 128, 2
    t = T // N
    block = t * (2 * k * h * e + 8)
    dkv = t * 2 * k * h * 4
    ring, gather, uly, hyb = plans["ring"], plans["allgather"], plans["ulysses"], plans["hybrid"]
    assert ring.sent_bytes == (N - 1) * (2 * block + dkv) + dkv
    assert ring.kv_bytes == 2 * block + 2 * dkv and ring.a2a_bytes == 0
    assert gather.kv_bytes == T * 2 * k * h * (e + 4) + T * 8
    assert gather.sent_bytes == (N - 1) * (2 * block + dkv)
    # 16 devices > a node of 8: the gather runs at the slow link's rate, fully exposed.
    assert gather.exposed_s == pytest.approx(gather.sent_bytes / 10e9)
    k_rep = 16  # 8 kv heads over 16 devices: each replicated once, so every device holds one
    moved = t * h * e * (2 * n + 2 * k_rep) + 16 * t
    assert uly.a2a_bytes == 2 * moved and uly.sent_bytes == int(2 * (N - 1) / N * moved)
    # Compute: 2·t·T·n·h forward FLOPs (causal) and 2.5× backward; one call over T keys.
    fwd = 2.0 * t * T * n * h / (100e12 * kernel_efficiency(T))
    assert gather.compute_s == pytest.approx(3.5 * fwd)
    assert ring.compute_s > gather.compute_s  # a hop's t keys per call run less efficiently
    assert hyb.ulysses_size == 8 and hyb.feasible


def test_feasibility_of_ulysses_and_hybrid():
    plans = _by_name(plan_strategies(**{**KW, "devices": 64}, links=LINKS["tpu-v5p"]))
    assert not plans["ulysses"].feasible and "divisible by 64" in plans["ulysses"].why_not
    assert plans["hybrid"].feasible and plans["hybrid"].ulysses_size == 8
    bad = _by_name(plan_strategies(**KW, links=LINKS["h100"], ulysses_size=3))
    assert not bad["hybrid"].feasible and "divides the 16 devices" in bad["hybrid"].why_not
    gqa = _by_name(plan_strategies(**{**KW, "devices": 8, "kv_heads": 2}, links=LINKS["h100"]))
    assert gqa["ulysses"].feasible  # 2 kv heads replicated to 8, one per device


def test_recommendations():
    # Free links and equal kernel rates (the CPU mesh): every strategy ties, the ring has the least memory.
    assert recommend(plan_strategies(**KW, links=LINKS["cpu"]))[0] == "ring"
    tpu = plan_strategies(**{**KW, "seq_len": 32768}, links=LINKS["tpu-v5p"])
    choice, why = recommend(tpu)
    assert choice != "ring" and "ring's speed" in why
    # Without room for a layer's gathered K/V, all-gather is never picked.
    gather = _by_name(tpu)["allgather"]
    assert recommend(tpu, gather.extra_bytes - 1)[0] != "allgather"
    choice, why = recommend(tpu, 0)  # room for nothing: the ring, which needs the least
    assert choice == "ring" and "least" in why


def test_auto_resolves_per_mesh_and_explicit_values_pass():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=1, sequence=4))
    cfg = model.preset("tiny")
    assert resolve_context_parallel(cfg, 256, 2, mesh)[0].context_parallel == "ring"  # CPU: links are free
    tpu = resolve_context_parallel(cfg.replace(dtype="bfloat16"), 32768, 2, mesh, links=LINKS["tpu-v5p"])
    assert tpu[0].context_parallel != "ring" and tpu[1]
    fixed = cfg.replace(context_parallel="allgather")
    assert resolve_context_parallel(fixed, 256, 2, mesh)[0] is fixed
    one = make_mesh(MeshConfig(data=1, fsdp=-1), devices=[mesh.devices.flat[0]])
    assert resolve_context_parallel(cfg, 256, 2, one)[0] is cfg  # no sequence axis: nothing to choose


def test_sharding_plan_prints_every_strategy_and_a_recommendation(capsys):
    args = ["plan", "--preset", "llama3-8b", "--seq-len", "262144", "--mesh", "data=1,fsdp=4,sequence=16",
            "--device-memory", "95GiB", "--device-type", "tpu-v5p", "--link", "ici-v5p"]  # fmt: skip
    assert sharding_main(args) == 0
    out = capsys.readouterr().out
    for name in ("ring", "allgather", "ulysses", "hybrid (8)", "recommended:"):
        assert f"\n{name}" in out
    assert sharding_main([*args, "--ulysses-size", "0"]) == 2
    assert "--ulysses-size must be positive" in capsys.readouterr().err
