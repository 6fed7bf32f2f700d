"""Attention for ringllama: one entry point, several exact implementations.

The project's one legend of shape letters (every module's shape comments, einsum strings and
``x_btd``-style suffixes use it; a letter never names a tensor or a count of something else):

    b batch (rows)         t query / token position   s key position      d embed (model width)
    n query heads          k kv heads                 g = n / k           h head_dim
    f mlp width            v vocabulary               l layers            c chunk length
    r = g·c query rows of one chunk and kv head       j chunk index / count of chunks (t/c)

Tensors are named by role with the letters as a suffix (``q_btnh``, ``k_bskh``, ``logits_bkrs``);
the bare ``q, k, v`` arguments below are the query, key and value tensors::

    attention(q_btnh, k_bskh, v_bskh, causal=..., segment_ids[b,t],
              q_positions[b,t], kv_positions[b,s], impl=...) -> out_btnh

Masks come from positions and segment ids, so any token order (ring layouts, packed
documents, KV caches) is handled by the same code.

Modules: `api` (the entry point), `axes` (logical axis names → mesh axes under the rules the
caller installed), `reference` (dense), `xla`, `blockwise` (flash-style, custom VJP, returns the
LSE) on the chunk loops of `flash`; `strategies` (context parallelism over a
mesh axis: ring, allgather, ulysses, hybrid), `driver` (the one hop loop and custom VJP every
non-dense implementation runs on), `local_kernels` (the kernels a hop runs, one interface) and
`kernel_table` (them by name, with `cudnn_kernel` and `cudnn_hop`: cuDNN hop forwards), `pallas_tpu`
and `pallas_mgpu` (Mosaic TPU and Mosaic GPU Pallas kernels),
`layout` (contiguous / zigzag / striped token layouts), `merge` (LSE merge), `instrument`
(run-time counts of executed chunk pairs and ring hops), `pallas_flash` (Pallas forward/backward
kernels with position/segment masks, Triton layout) and `kernels` (the compile target and the
choice of kernel).
"""

from attention.api import IMPLS, KERNELS, AttentionError, attention, choose_impl, choose_kernel, ring_problem
from attention.axes import RulesError
from attention.blockwise import blockwise_attention
from attention.driver import DriverConfig, attend
from attention.instrument import count_work
from attention.kernel_table import KERNEL_TABLE, get_kernel
from attention.kernels import PLATFORMS, Target, compile_target, current_target
from attention.layout import (
    LAYOUTS,
    LayoutError,
    check_layout,
    from_layout,
    from_layout_tree,
    layout_permutation,
    layout_positions,
    to_layout,
    to_layout_tree,
)
from attention.local_kernels import KernelSpec, LocalKernel
from attention.masks import EMPTY_POSITION, default_positions, make_mask
from attention.merge import merge_partials
from attention.pallas_flash import pallas_backward, pallas_forward
from attention.reference import reference_attention
from attention.strategies import STRATEGIES, RingError, context_parallel_shard, sharded_attention, ulysses_heads

__all__ = [
    "EMPTY_POSITION",
    "IMPLS",
    "KERNELS",
    "PLATFORMS",
    "Target",
    "compile_target",
    "current_target",
    "LAYOUTS",
    "KERNEL_TABLE",
    "STRATEGIES",
    "DriverConfig",
    "KernelSpec",
    "LocalKernel",
    "AttentionError",
    "LayoutError",
    "RingError",
    "RulesError",
    "attention",
    "attend",
    "blockwise_attention",
    "context_parallel_shard",
    "get_kernel",
    "check_layout",
    "choose_impl",
    "choose_kernel",
    "count_work",
    "default_positions",
    "from_layout",
    "from_layout_tree",
    "layout_permutation",
    "layout_positions",
    "make_mask",
    "merge_partials",
    "pallas_backward",
    "pallas_forward",
    "reference_attention",
    "ring_problem",
    "sharded_attention",
    "to_layout",
    "to_layout_tree",
    "ulysses_heads",
]
