"""The attention package's error type, the compile target and the choice of local kernel.

This is the bottom of ``attention``: every implementation module and the `attention.api` entry
point import from here, so the entry point can import the implementations without a cycle.

**The target.** Which kernel runs, and whether Pallas interprets it, follow the platform the
program is *compiled for*, which is not always the host's default backend: ``python -m sharding
compile`` lowers for a TPU or a GPU on a CPU-only host. `compile_target` names that platform for
the code traced inside it; outside one, the target is the default backend (and, on GPU, the first
device's compute capability)::

    with attention.compile_target("tpu"):
        jax.jit(step).trace(*abstract_args).lower(lowering_platforms=("tpu",)).compile()

**Kernels** (``kernel=``): ``jnp`` (chunk loops in plain JAX, any platform), ``mosaic_tpu``
(Pallas on TPU), ``mosaic_gpu`` (Pallas on Hopper and newer GPUs), ``triton`` (Pallas's Triton
backend: older GPUs, and the kernel the CPU interprets for ``pallas``), or the aliases ``pallas``
(the Pallas kernel of the target) and ``auto`` (`choose_kernel`). ``cudnn`` (ring hops' forward on
cuDNN where its masks are exact, `attention.cudnn_kernel`; bf16/f16 on GPU) is opt-in only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp

KERNELS = ("auto", "jnp", "pallas", "mosaic_tpu", "mosaic_gpu", "triton", "cudnn")
PLATFORMS = ("cpu", "gpu", "tpu")


class AttentionError(ValueError):
    """Inputs the attention implementations cannot take; the message says what to change."""


@dataclass(frozen=True)
class Target:
    """The platform a traced program is compiled for.

    Attributes:
        platform: ``cpu``, ``gpu`` or ``tpu``.
        compute_capability: a GPU's, e.g. ``9.0`` for H100/H200, ``8.0`` for A100 (None off GPU
            or unknown).
    """

    platform: str
    compute_capability: float | None = None

    @property
    def interpret(self) -> bool:
        """Pallas interpret mode: on unless the target compiles Pallas (GPU, TPU)."""
        return self.platform not in ("gpu", "tpu")


_TARGET: contextvars.ContextVar[Target | None] = contextvars.ContextVar("ringllama_attention_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str, compute_capability: float | None = None) -> Iterator[Target]:
    """Trace the code inside for ``platform`` (``cpu | gpu | tpu``), whatever the host's backend.

    Kernel choice (`choose_kernel`, `choose_impl`), Pallas interpret mode and backend compiler
    settings read it. Scoped to this context (a ``contextvars`` variable), never a global.
    """
    if platform not in PLATFORMS:
        raise AttentionError(f"unknown compile target {platform!r}: use one of {', '.join(PLATFORMS)}.")
    token = _TARGET.set(Target(platform, compute_capability))
    try:
        yield _TARGET.get()
    finally:
        _TARGET.reset(token)


def current_target() -> Target:
    """The innermost `compile_target`, else the default backend (with the GPU's compute capability)."""
    target = _TARGET.get()
    if target is not None:
        return target
    platform = jax.default_backend()
    if platform != "gpu":
        return Target(platform if platform in PLATFORMS else "cpu")
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return Target("gpu", float(cc) if cc else None)


def _pallas_for(target: Target) -> str:
    if target.platform == "tpu":
        return "mosaic_tpu"
    if target.platform == "gpu" and (target.compute_capability or 0) >= 9.0:
        return "mosaic_gpu"
    return "triton"  # pre-Hopper GPUs, and the kernel the CPU interprets


def choose_kernel(
    kernel: str = "auto",
    platform: str | None = None,
    head_dim: int | None = None,
    target: Target | None = None,
    dtype=None,
) -> str:
    """The local kernel ``kernel`` resolves to: ``jnp``, ``mosaic_tpu``, ``mosaic_gpu`` or ``triton``.

    ``pallas`` is the Pallas kernel of the target: Mosaic on TPU, Mosaic GPU on compute capability
    9.0 and newer, Triton on older GPUs and (interpreted) on CPU. ``auto`` is that kernel on GPU
    and TPU and ``jnp`` on CPU, where Pallas would only interpret. On Hopper, ``auto`` takes Triton
    for what Mosaic GPU cannot (fp32 inputs: WGMMA reads fp32 as tf32 and takes no fp32 register
    operand; head sizes that are not multiples of 64); a head size Triton cannot tile (not a power
    of two) stays on ``jnp``.

    Args:
        kernel: one of `KERNELS`.
        platform: shorthand for ``target=Target(platform)``.
        head_dim: the head size, when known.
        target: the compile target (default: `current_target`).
        dtype: the inputs' dtype, when known.
    """
    if kernel not in KERNELS:
        raise AttentionError(f"unknown attention kernel {kernel!r}: use one of {', '.join(KERNELS)}.")
    if kernel not in ("auto", "pallas"):
        return kernel
    target = target or (Target(platform) if platform else current_target())
    chosen = _pallas_for(target)
    if kernel == "auto" and target.platform not in ("gpu", "tpu"):
        return "jnp"
    if kernel == "auto" and chosen == "mosaic_gpu":
        fp32 = dtype is not None and jnp.dtype(dtype) == jnp.float32
        if fp32 or (head_dim is not None and head_dim % 64):
            chosen = "triton"
    pow2 = head_dim is None or (head_dim > 0 and head_dim & (head_dim - 1) == 0)
    if kernel == "auto" and chosen == "triton" and not pow2:
        return "jnp"
    return chosen
