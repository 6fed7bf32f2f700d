"""The one table of local kernels, by the names `attention.choose_kernel` resolves to.

The kernels of `attention.local_kernels` (jnp loops, Triton, Mosaic TPU, Mosaic GPU) and those
built on them (`attention.cudnn_kernel`: cuDNN forwards with a Pallas fallback and backward).
"""

from __future__ import annotations

from attention import cudnn_kernel
from attention.kernels import AttentionError
from attention.local_kernels import BASE_KERNELS, LocalKernel

KERNEL_TABLE: dict[str, LocalKernel] = {
    **BASE_KERNELS,
    "cudnn": LocalKernel("cudnn", cudnn_kernel.forward, cudnn_kernel.backward, cudnn_kernel.tile, checks_vma=False),
}


def get_kernel(name: str) -> LocalKernel:
    """The `LocalKernel` registered under a resolved kernel name (`attention.choose_kernel`)."""
    if name not in KERNEL_TABLE:
        raise AttentionError(
            f"attention kernel {name!r} is not available in this build: use one of {', '.join(KERNEL_TABLE)}."
        )
    return KERNEL_TABLE[name]
