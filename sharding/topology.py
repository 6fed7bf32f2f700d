"""Compile targets by their cloud names: TPU slices (deviceless, through libtpu) and GPU nodes.

One table, `TOPOLOGIES`, maps a name to what ``jax.experimental.topologies.get_topology_desc``
needs to hand out that slice's devices on a CPU-only host (the real XLA TPU compiler, libtpu,
compiles for them) plus the chip's HBM; `GPUS` does the same for CUDA targets, which are only
lowered (``jax.export``), never compiled, here.

Naming: Cloud's v4 and v5p names count TensorCores (two per chip, one JAX device per chip in
``megacore`` mode), so ``v5p-8`` is 4 chips (``v5p:2x2x1``); v5e and v6e names count chips (one
TensorCore each), so ``v5e-8`` is 8 chips (``v5e:2x4``). HBM per chip is the Cloud TPU docs'
figure: v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e 32 GiB.

    devices = tpu_devices("v5p-128")     # 64 abstract v5p devices; needs libtpu (`make test` installs it)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from jax.experimental.topologies import get_topology_desc

GiB = 1024**3


class TopologyError(ValueError):
    """An unknown or unusable compile target; the message names it and the fix."""


@dataclass(frozen=True)
class TpuTopology:
    """A TPU slice: the ``get_topology_desc`` arguments and the HBM of one chip."""

    name: str
    topology_name: str  # e.g. "v5p:4x4x4" (chips along each torus axis)
    chip_config_name: str  # "megacore" (v4/v5p: one device per chip) or "default" (v5e/v6e)
    chips_per_host_bounds: tuple[int, int, int]
    hbm_bytes: int
    num_slices: int = 1

    @property
    def chips(self) -> int:
        shape = self.topology_name.partition(":")[2]
        return math.prod(int(x) for x in shape.split("x")) * self.num_slices


@dataclass(frozen=True)
class GpuTarget:
    """A CUDA node: the compute capability the kernels are chosen for and GPUs per node."""

    name: str
    compute_capability: float
    devices_per_node: int
    hbm_bytes: int


def _tpu(gen: str, cores_or_chips: int, shape: str, hbm_gib: int) -> tuple[str, TpuTopology]:
    megacore = gen in ("v4", "v5p")
    dims = tuple(int(x) for x in shape.split("x"))
    if megacore:  # hosts hold 2x2x1 chips
        bounds = (min(2, dims[0]), min(2, dims[1]), 1)
    else:  # v5e/v6e hosts hold 2x4 chips
        bounds = (min(2, dims[0]), min(4, dims[1]), 1)
    name = f"{gen}-{cores_or_chips}"
    topo = TpuTopology(name, f"{gen}:{shape}", "megacore" if megacore else "default", bounds, hbm_gib * GiB)
    assert topo.chips * (2 if megacore else 1) == cores_or_chips, name
    return name, topo


TOPOLOGIES: dict[str, TpuTopology] = dict(
    [
        _tpu("v4", 8, "2x2x1", 32),
        _tpu("v4", 16, "2x2x2", 32),
        _tpu("v4", 32, "2x2x4", 32),
        _tpu("v4", 64, "2x4x4", 32),
        _tpu("v4", 128, "4x4x4", 32),
        _tpu("v4", 256, "4x4x8", 32),
        _tpu("v4", 512, "4x8x8", 32),
        _tpu("v4", 1024, "8x8x8", 32),
        _tpu("v5p", 8, "2x2x1", 95),
        _tpu("v5p", 16, "2x2x2", 95),
        _tpu("v5p", 32, "2x2x4", 95),
        _tpu("v5p", 64, "2x4x4", 95),
        _tpu("v5p", 128, "4x4x4", 95),
        _tpu("v5p", 256, "4x4x8", 95),
        _tpu("v5p", 512, "4x8x8", 95),
        _tpu("v5p", 1024, "8x8x8", 95),
        _tpu("v5p", 2048, "8x8x16", 95),
        _tpu("v5e", 1, "1x1", 16),
        _tpu("v5e", 4, "2x2", 16),
        _tpu("v5e", 8, "2x4", 16),
        _tpu("v5e", 16, "4x4", 16),
        _tpu("v5e", 32, "4x8", 16),
        _tpu("v5e", 64, "8x8", 16),
        _tpu("v5e", 128, "8x16", 16),
        _tpu("v5e", 256, "16x16", 16),
        _tpu("v6e", 1, "1x1", 32),
        _tpu("v6e", 4, "2x2", 32),
        _tpu("v6e", 8, "2x4", 32),
        _tpu("v6e", 16, "4x4", 32),
        _tpu("v6e", 32, "4x8", 32),
        _tpu("v6e", 64, "8x8", 32),
        _tpu("v6e", 128, "8x16", 32),
        _tpu("v6e", 256, "16x16", 32),
    ]
)

# One 8-GPU node each (a run config's mesh may ask for more: then that many GPUs).
GPUS: dict[str, GpuTarget] = {
    "h100": GpuTarget("h100", 9.0, 8, 80 * GiB),
    "h200": GpuTarget("h200", 9.0, 8, 141 * GiB),
    "a100": GpuTarget("a100", 8.0, 8, 80 * GiB),
}


def known_targets() -> str:
    """Every target name, for error messages."""
    return ", ".join([*TOPOLOGIES, *GPUS])


def target(name: str) -> TpuTopology | GpuTarget:
    """The TPU slice or GPU node called ``name``; `TopologyError` naming the known ones otherwise."""
    key = name.strip().lower().replace("v5litepod", "v5e")
    if key in TOPOLOGIES:
        return TOPOLOGIES[key]
    if key in GPUS:
        return GPUS[key]
    raise TopologyError(f"unknown topology {name!r}: use one of {known_targets()}.")


def tpu_devices(name: str | TpuTopology) -> list:
    """The abstract devices of TPU slice ``name`` (compile-only: nothing runs on them).

    Needs libtpu (``pip install "jax[tpu]==<your jax>"``; `make test` installs it) and, on a host
    without TPUs, ``JAX_PLATFORMS=cpu`` and ``TPU_SKIP_MDS_QUERY=1`` set before jax starts.
    """
    topo = target(name) if isinstance(name, str) else name
    if not isinstance(topo, TpuTopology):
        raise TopologyError(f"{topo.name} is a GPU target: it has no TPU devices to compile for.")
    # Read by libtpu when it loads: no GCE metadata lookups, and no host-wide lock (nothing runs on a TPU
    # here, so concurrent compiling processes are fine).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = get_topology_desc(
            platform="tpu",
            topology_name=topo.topology_name,
            chip_config_name=topo.chip_config_name,
            chips_per_host_bounds=topo.chips_per_host_bounds,
            num_slices=topo.num_slices,
        )
    except Exception as exc:  # jaxlib raises a bare RuntimeError/JaxRuntimeError without libtpu
        raise TopologyError(
            f"cannot get the {topo.name} TPU devices ({str(exc).splitlines()[0][:160]}): install libtpu with "
            '`pip install "jax[tpu]==<your jax version>"` (`make test` does) and set JAX_PLATFORMS=cpu.'
        ) from None
    return list(desc.devices)
