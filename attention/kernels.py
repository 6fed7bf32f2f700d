"""The attention package's error type and the choice of local kernel: the bottom of ``attention``.

Every implementation module (blockwise, ring, layout) and the `attention.api` entry point import
from here, so the entry point can import the implementations without a cycle.
"""

from __future__ import annotations

import jax

KERNELS = ("auto", "jnp", "pallas")


class AttentionError(ValueError):
    """Inputs the attention implementations cannot take; the message says what to change."""


def choose_kernel(kernel: str = "auto", platform: str | None = None, head_dim: int | None = None) -> str:
    """The local kernel ``kernel`` resolves to: ``jnp`` or ``pallas``.

    ``auto`` is ``pallas`` on GPU (Triton) and ``jnp`` elsewhere: on CPU the kernels would run in
    Pallas's (slow) interpret mode, and on TPU their block layout does not yet meet Mosaic's
    tiling rules, so ``jnp`` stays the TPU default until it is measured there. A head size that is
    not a power of two also stays on ``jnp``: Triton loads only power-of-two tiles.
    """
    if kernel not in KERNELS:
        raise AttentionError(f"unknown attention kernel {kernel!r}: use one of {', '.join(KERNELS)}.")
    if kernel != "auto":
        return kernel
    pow2 = head_dim is None or (head_dim > 0 and head_dim & (head_dim - 1) == 0)
    return "pallas" if (platform or jax.default_backend()) == "gpu" and pow2 else "jnp"
