"""Will the ring hide its communication? Per-hop attention compute time against K/V transfer time.

Symbols (shape letters as in the `attention` legend): b batch per device, L tokens per device
(``seq_len / sequence``), n / k query / kv heads per device (divided by ``tensor`` when it divides
them), h head_dim, e bytes per element, φ the fraction of a hop's chunk pairs computed.

Every ring hop, each device attends its L queries to one L-token K/V block while the next
block travels one step around the ``sequence`` axis (`attention.ring` issues the ``ppermute``
before the hop's compute). The hop hides its transfer when it is compute-bound:

- forward FLOPs  ``4·b·L²·n·h·φ`` (QKᵀ and PV, 2 FLOPs a multiply-add; ``φ = ½`` causal in a
  balanced zigzag/striped layout, where every hop computes half its block pairs, 1 otherwise);
  bytes ``b·L·(2·k·h·e + 8)``: K and V in ``e``-byte elements plus int32 positions and segment ids;
- backward FLOPs ``2.5×`` the forward's (recomputed QKᵀ, then dV, dP, dQ, dK: 5 matmuls for 2),
  bytes the forward's plus the fp32 dK/dV accumulator that travels with its block ``b·L·2·k·h·4``.

Compute grows as L² and traffic as L, so with FLOPs ``c_f·L²`` and bytes ``c_b·L`` the hop is
compute-bound from ``L* = c_b·F / (c_f·B)`` tokens per device, F the kernel's FLOP/s and B the
link's one-way bytes/s (b and h cancel out of the forward's ``L*``).

The device FLOP/s are *kernel* (achieved flash-attention) rates, not peaks: the table's values are
assumptions until measured — `benchmarks/gpu.py` prints the measured TFLOP/s to pass as
``--kernel-tflops``. Link rates are one direction of one link to the ring neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Assumed flash-attention kernel throughput, bf16 TFLOP/s per device (≈ 40% of the dense bf16 peak:
# H100/H200 989, A100 312, TPU v5p 459, v5e 197); replace with a measured number (--kernel-tflops).
KERNEL_TFLOPS = {"h100": 400.0, "h200": 400.0, "a100": 125.0, "tpu-v5p": 180.0, "tpu-v5e": 80.0}
# One-way bandwidth to the ring neighbour, GB/s: NVLink 4 (H100/H200 SXM) 900 GB/s bidirectional per
# GPU; NVLink 3 (A100) 600; InfiniBand NDR / HDR one 400 / 200 Gb/s NIC per GPU; TPU v5p ICI
# 1200 GB/s bidirectional per chip over 6 torus links; v5e 1600 Gb/s per chip over 4 links.
LINK_GBYTES = {"nvlink4": 450.0, "nvlink3": 300.0, "ib-ndr": 50.0, "ib-hdr": 25.0, "ici-v5p": 100.0, "ici-v5e": 25.0}
BACKWARD_FLOP_RATIO = 2.5


class CommError(ValueError):
    """A device, link or shape the overlap model cannot take; the message says what to pass."""


@dataclass(frozen=True)
class HopCost:
    """One direction (forward or backward) of one ring hop, per device and layer."""

    flops: float
    bytes: float
    compute_s: float
    transfer_s: float
    min_local_len: int  # smallest L (tokens per device) at which the hop is compute-bound

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.transfer_s


@dataclass(frozen=True)
class OverlapPlan:
    """Forward and backward hop costs for one configuration."""

    ring: int
    local_len: int
    kernel_tflops: float
    link_gbytes: float
    forward: HopCost
    backward: HopCost

    def table(self) -> str:
        """The human-readable per-hop table ``python -m sharding plan`` prints."""
        lines = [
            f"ring hops: {self.ring} per layer, {self.local_len} tokens per device; kernel {self.kernel_tflops:g} "
            f"TFLOP/s, link {self.link_gbytes:g} GB/s one way",
            f"{'hop':<9}{'GFLOP':>10}{'compute ms':>12}{'MB sent':>10}{'transfer ms':>13}  {'bound':<9}"
            f"{'compute-bound from L =':>24}",
        ]
        for name, hop in (("forward", self.forward), ("backward", self.backward)):
            bound = "compute" if hop.compute_bound else "comm"
            lines.append(
                f"{name:<9}{hop.flops / 1e9:>10.1f}{hop.compute_s * 1e3:>12.3f}{hop.bytes / 1e6:>10.2f}"
                f"{hop.transfer_s * 1e3:>13.3f}  {bound:<9}{hop.min_local_len:>16} tokens/device"
            )
        need = max(self.forward.min_local_len, self.backward.min_local_len)
        verdict = "hidden" if self.forward.compute_bound and self.backward.compute_bound else "NOT hidden"
        lines.append(
            f"communication {verdict}: every hop is compute-bound from {need} tokens per device "
            f"(sequence ≥ {need * self.ring} on this ring)"
        )
        return "\n".join(lines)


def _hop(c_f: float, c_b: float, local_len: int, flops_per_s: float, bytes_per_s: float) -> HopCost:
    flops, nbytes = c_f * local_len**2, c_b * local_len
    return HopCost(
        flops=flops,
        bytes=nbytes,
        compute_s=flops / flops_per_s,
        transfer_s=nbytes / bytes_per_s,
        min_local_len=math.ceil(c_b * flops_per_s / (c_f * bytes_per_s)),
    )


def overlap_plan(
    *,
    seq_len: int,
    ring: int,
    batch_per_device: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    kernel_tflops: float,
    link_gbytes: float,
    causal: bool = True,
    kv_bytes: int = 2,
) -> OverlapPlan:
    """Per-hop compute and transfer times of ring attention on one device (heads already per device).

    Args:
        seq_len: tokens per sequence; ring: ``sequence`` axis size (it must divide seq_len).
        batch_per_device: sequences each device holds; heads / kv_heads / head_dim: per device.
        kernel_tflops: achieved attention kernel TFLOP/s; link_gbytes: one-way GB/s to the neighbour.
        causal: halve the FLOPs (balanced layout); kv_bytes: bytes per K/V element (2 for bf16).

    Returns:
        The `OverlapPlan` with forward and backward `HopCost`.
    """
    if ring < 1 or seq_len % ring:
        raise CommError(f"sequence length {seq_len} is not divisible by the {ring} ring shards.")
    if kernel_tflops <= 0 or link_gbytes <= 0:
        raise CommError("kernel TFLOP/s and link GB/s must be positive: pass --kernel-tflops / --link-gbps.")
    local = seq_len // ring
    frac = 0.5 if causal else 1.0
    b = batch_per_device
    c_f = 4.0 * b * heads * head_dim * frac
    c_b = b * (2.0 * kv_heads * head_dim * kv_bytes + 8.0)
    c_b_bwd = c_b + b * 2.0 * kv_heads * head_dim * 4.0
    flops_per_s, bytes_per_s = kernel_tflops * 1e12, link_gbytes * 1e9
    return OverlapPlan(
        ring=ring,
        local_len=local,
        kernel_tflops=kernel_tflops,
        link_gbytes=link_gbytes,
        forward=_hop(c_f, c_b, local, flops_per_s, bytes_per_s),
        backward=_hop(BACKWARD_FLOP_RATIO * c_f, c_b_bwd, local, flops_per_s, bytes_per_s),
    )


def resolve_rates(
    device: str | None, kernel_tflops: float | None, link: str | None, link_gbytes: float | None
) -> tuple[float, float]:
    """(TFLOP/s, GB/s) from table names or explicit numbers (numbers win)."""
    if kernel_tflops is None:
        if device not in KERNEL_TFLOPS:
            raise CommError(
                f"unknown --device-type {device!r}: use one of {', '.join(KERNEL_TFLOPS)} or --kernel-tflops."
            )
        kernel_tflops = KERNEL_TFLOPS[device]
    if link_gbytes is None:
        if link not in LINK_GBYTES:
            raise CommError(f"unknown --link {link!r}: use one of {', '.join(LINK_GBYTES)} or --link-gbps.")
        link_gbytes = LINK_GBYTES[link]
    return kernel_tflops, link_gbytes


def model_overlap_plan(cfg, seq_len: int, batch: int, mesh_sizes: dict[str, int], kernel_tflops, link_gbytes):
    """`overlap_plan` for a `model.LlamaConfig` on a resolved mesh ``{axis: size}`` (None without a ring)."""
    ring = mesh_sizes.get("sequence", 1)
    if ring <= 1:
        return None
    batch_shards = mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
    tensor = mesh_sizes.get("tensor", 1)
    split = tensor if cfg.num_heads % tensor == 0 and cfg.num_kv_heads % tensor == 0 else 1
    return overlap_plan(
        seq_len=seq_len,
        ring=ring,
        batch_per_device=max(1, batch // batch_shards),
        heads=cfg.num_heads // split,
        kv_heads=cfg.num_kv_heads // split,
        head_dim=cfg.head_dim,
        kernel_tflops=kernel_tflops,
        link_gbytes=link_gbytes,
        kv_bytes=2 if cfg.dtype in ("bfloat16", "float16") else 4,
    )
