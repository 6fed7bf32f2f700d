"""The one mesh builder: `MeshConfig(data, fsdp, tensor, sequence)` → `jax.sharding.Mesh`.

Axis order is ``(data, fsdp, tensor, sequence)``: the ``sequence`` (ring) axis is innermost,
so ring neighbours are adjacent devices — on GPU the same NVLink island, on TPU neighbours in
the ICI torus (``jax.make_mesh`` orders devices by physical topology). All axes are
``AxisType.Auto`` (GSPMD-style propagation plus explicit constraints), passed explicitly
because ``jax.make_mesh`` otherwise defaults to ``Explicit``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "sequence")


class MeshError(ValueError):
    """A mesh shape that does not fit the devices; the message says what to change."""


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; at most one may be ``-1`` (all remaining devices)."""

    data: int = 1
    """data-parallel replicas"""
    fsdp: int = -1
    """fully-sharded data parallel (params and optimizer state sharded)"""
    tensor: int = 1
    """tensor parallel (heads, MLP)"""
    sequence: int = 1
    """sequence parallel: the ring of ring attention"""

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """Concrete axis sizes for ``num_devices`` devices, in `AXES` order."""
        sizes = [self.data, self.fsdp, self.tensor, self.sequence]
        if any(s == 0 or s < -1 for s in sizes):
            raise MeshError(f"mesh axis sizes must be positive or -1, got {self.describe()}.")
        if sizes.count(-1) > 1:
            raise MeshError(f"only one mesh axis may be -1 (the rest), got {self.describe()}.")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise MeshError(
                    f"mesh {self.describe()} cannot use {num_devices} devices: {known} does not divide {num_devices}."
                )
            sizes[sizes.index(-1)] = num_devices // known
        elif known != num_devices:
            raise MeshError(
                f"mesh {self.describe()} needs {known} devices but {num_devices} are available: "
                "make the axis sizes multiply to the device count (or use -1 for one axis)."
            )
        return tuple(sizes)

    def describe(self) -> str:
        return ",".join(f"{a}={getattr(self, a)}" for a in AXES)

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parse ``"data=2,sequence=4"`` (unnamed axes keep their defaults, fsdp=-1 unless given)."""
        kwargs: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name not in AXES or not value.lstrip("-").isdigit():
                raise MeshError(f"bad mesh entry {part!r}: write axis=size with axes {', '.join(AXES)}.")
            kwargs[name] = int(value)
        if "fsdp" not in kwargs and -1 in kwargs.values():
            kwargs["fsdp"] = 1
        cfg = cls(**kwargs)
        if "fsdp" not in kwargs and -1 not in kwargs.values():
            cfg = dataclasses.replace(cfg, fsdp=-1)
        return cfg


def make_mesh(config: MeshConfig | None = None, devices=None) -> Mesh:
    """Build the 4-axis mesh ``(data, fsdp, tensor, sequence)`` over ``devices`` (default: all)."""
    config = config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
