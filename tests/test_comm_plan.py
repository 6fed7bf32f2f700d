"""The ring's comm/compute overlap model (`sharding.comm`) against numbers worked out by hand."""

import math

import pytest

from sharding import cli
from sharding.comm import CommError, overlap_plan, resolve_rates


def test_overlap_formula_matches_hand_computed_llama3_8b_hop():
    # Llama-3-8B heads (32 q / 8 kv, head_dim 128), 65,536 tokens on an 8-way ring: L = 8192 per device;
    # 400 TFLOP/s kernel, InfiniBand NDR 50 GB/s one way, bf16 K/V, causal (half the block pairs).
    plan = overlap_plan(
        seq_len=65536, ring=8, batch_per_device=1, heads=32, kv_heads=8, head_dim=128,
        kernel_tflops=400.0, link_gbytes=50.0,
    )  # fmt: skip
    # forward: 4·8192²·32·128·½ = 549,755,813,888 FLOPs → 1.374 ms;
    # K+V 2·8192·8·128·2 = 33,554,432 B + positions/segments 2·8192·4 = 65,536 B → 0.672 ms.
    assert plan.local_len == 8192
    assert plan.forward.flops == 549_755_813_888
    assert plan.forward.bytes == 33_619_968
    assert math.isclose(plan.forward.compute_s, 549_755_813_888 / 400e12)
    assert math.isclose(plan.forward.transfer_s, 33_619_968 / 50e9)
    assert plan.forward.compute_bound
    # L* = c_b·F / (c_f·B) = 4104 B/token · 400e12 / (8192 FLOP/token² · 50e9) = 4007.8 → 4008.
    assert plan.forward.min_local_len == 4008
    # backward: 2.5× FLOPs; bytes + fp32 dK/dV accumulator 2·8192·8·128·4 = 67,108,864 → 100,728,832 B.
    assert plan.backward.flops == 2.5 * 549_755_813_888
    assert plan.backward.bytes == 100_728_832
    # L* = (4104 + 8192) · 400e12 / (2.5 · 8192 · 50e9) = 4803.1 → 4804.
    assert plan.backward.min_local_len == 4804 and plan.backward.compute_bound
    # Below L* the hop is communication-bound: 32,768 tokens on the same ring is 4096 per device.
    short = overlap_plan(
        seq_len=32768, ring=8, batch_per_device=1, heads=32, kv_heads=8, head_dim=128,
        kernel_tflops=400.0, link_gbytes=50.0,
    )  # fmt: skip
    assert short.forward.compute_bound and not short.backward.compute_bound


def test_rates_from_tables_and_flags():
    assert resolve_rates("h100", None, "nvlink4", None) == (400.0, 450.0)
    assert resolve_rates("h100", 612.5, "nvlink4", 80.0) == (612.5, 80.0)
    with pytest.raises(CommError, match="unknown --device-type 'v100'"):
        resolve_rates("v100", None, "nvlink4", None)
    with pytest.raises(CommError, match="unknown --link 'ethernet'"):
        resolve_rates("h100", None, "ethernet", None)


def test_plan_cli_prints_the_hop_table(capsys):
    argv = ["plan", "--preset", "llama3-8b", "--seq-len", "65536", "--mesh", "data=1,fsdp=1,tensor=1,sequence=8"]
    assert cli.main([*argv, "--kernel-tflops", "400", "--link-gbps", "50"]) == 0
    out = capsys.readouterr().out
    assert "8192 tokens per device" in out and "4008 tokens/device" in out and "4804 tokens/device" in out
    assert "communication hidden" in out
    assert cli.main([*argv, "--link", "carrier-pigeon"]) == 2
    assert "unknown --link 'carrier-pigeon'" in capsys.readouterr().err
    # No ring: nothing to overlap, no hop table.
    assert cli.main(["plan", "--seq-len", "8192", "--mesh", "data=1,fsdp=8,tensor=1,sequence=1"]) == 0
    assert "ring hops" not in capsys.readouterr().out
