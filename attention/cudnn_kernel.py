"""The ``cudnn`` local kernel: a hop's forward on cuDNN wherever cuDNN's own masks are exact.

Shape letters: the legend in `attention` (b t s n k h here).

cuDNN's fused attention takes no positions or segment ids, only "no mask" or "causal" (top-left
aligned, t == s). A ring hop in general needs position masks, but its pieces often do not: a
zigzag shard holds one early and one late chunk of the sequence, and between a query chunk and a
key chunk the causal mask is either nothing, everything, or the diagonal. So each hop splits the
query block and the key block into their halves (`local_kernels.pad_halves` made each half a
whole number of tiles, so a split never cuts a tile) and classifies each of the four sub-pairs
at run time, from positions and segment ids, for every batch row at once:

- hidden: every pair masked (`flash.block_is_masked`) → zeros and ``-inf``, no compute;
- causal diagonal: identical, strictly increasing query and key positions, one document, no
  padding → ``cudnn_forward(causal=True)`` (the causal mask by index is then the mask by position);
- fully visible: one document on both sides, no padding keys and, if causal, no key after any
  query → ``cudnn_forward(causal=False)``;
- anything else (documents crossing the sub-pair, interleaved striped positions, padding) → the
  fallback Pallas kernel of the target (Mosaic GPU on compute capability ≥ 9, else Triton).

A ``lax.switch`` runs only the chosen branch, and the two key halves of each query half merge by
log-sum-exp (`merge.merge_partials`, fp32). The classification is exact, not a heuristic: a
sub-pair runs on cuDNN only when cuDNN's mask equals the position/segment mask.

The backward is the fallback kernel's on the whole hop, fed by the driver with the *global* LSE
and delta (cuDNN's VJP starts from its own hop's statistics, so it cannot serve a ring).

cuDNN takes bf16/f16 only, so ``cudnn`` is an explicit opt-in (``kernel="cudnn"``) that
`attention.choose_kernel` never picks by itself. On a CPU target the cuDNN branches run
`cudnn_forward`'s ``xla`` implementation (JAX's dense path of the same function, fp32 included)
and the fallback runs interpreted Triton, so the whole path is checkable on the emulated mesh.

Counts (`attention.instrument`, with ``counter=``): ``cudnn_fwd`` per sub-pair run on cuDNN and
``cudnn_fallback_fwd`` per sub-pair run on the fallback kernel, by ring position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attention import instrument
from attention.cudnn_hop import cudnn_forward
from attention.flash import KV_PAD, block_is_masked, vary_like
from attention.kernels import AttentionError, choose_kernel, current_target
from attention.local_kernels import BASE_KERNELS
from attention.merge import merge_partials

HIDDEN, VISIBLE, DIAGONAL, FALLBACK = 0, 1, 2, 3  # sub-pair classes, the lax.switch branch index


def fallback_name() -> str:
    """The Pallas kernel for sub-pairs cuDNN cannot take, and for the backward: the target's."""
    target = current_target()
    if target.platform == "tpu":
        raise AttentionError("kernel='cudnn' runs on GPUs (and on CPU for checking); on TPU use kernel='pallas'.")
    return choose_kernel("pallas", target=target)  # mosaic_gpu on cc >= 9, else triton (interpreted on CPU)


def _fallback():
    return BASE_KERNELS[fallback_name()]


def tile(spec, length: int) -> int:
    """The fallback kernel's tile: its sub-pairs then stay whole tiles of it."""
    return _fallback().tile(spec, length)


def _halves(x: jax.Array, tile_len: int) -> list[jax.Array]:
    """``x [b, L, ...]`` as its two halves when each is whole tiles of ``tile_len``, else ``[x]``."""
    length = x.shape[1]
    if length < 2 or length % 2 or (tile_len and (length // 2) % tile_len):
        return [x]
    return [x[:, : length // 2], x[:, length // 2 :]]


def classify(qp, kp, qs, ks, causal: bool) -> jax.Array:
    """int32 class of a sub-pair (`HIDDEN`, `VISIBLE`, `DIAGONAL` or `FALLBACK`), for every batch row.

    Args:
        qp, qs: query positions / segment ids ``[b, t]``; kp, ks: key ones ``[b, s]``.
        causal: hide keys at later positions.
    """
    one_doc = (jnp.min(qs, 1) == jnp.max(qs, 1)) & (jnp.min(ks, 1) == jnp.max(ks, 1)) & (qs[:, 0] == ks[:, 0])
    plain = jnp.all(one_doc & ~jnp.any(kp == KV_PAD, 1))  # [b] -> scalar: one document, no padding keys
    # Padded query rows sit at Q_PAD (before every key), so they fail the causal test: not visible.
    visible = plain & (jnp.all(jnp.max(kp, 1) <= jnp.min(qp, 1)) if causal else True)
    if causal and qp.shape == kp.shape:
        # Same positions on both sides, strictly increasing: row i sees key j iff i >= j, cuDNN's causal mask.
        increasing = jnp.all(qp[:, 1:] > qp[:, :-1]) if qp.shape[1] > 1 else True
        diagonal = plain & jnp.all(qp == kp) & increasing
    else:
        diagonal = jnp.bool_(False)
    hidden = block_is_masked(qp, kp, qs, ks, causal)
    kind = jnp.where(diagonal, DIAGONAL, jnp.where(visible, VISIBLE, FALLBACK))
    return jnp.where(hidden, HIDDEN, kind).astype(jnp.int32)


def _empty(q, *refs):
    out = vary_like(jnp.zeros(q.shape, jnp.float32), q, *refs)
    return out, jnp.full_like(out, -jnp.inf, shape=q.shape[:3])


def _sub_pair(spec, fallback, implementation, index, q, k, v, qp, kp, qs, ks):
    """One (query half, key half) sub-pair: fp32 ``out [b, t', n, h]`` and ``lse [b, t', n]``."""

    def on_cudnn(causal: bool):
        def run():
            instrument.record(spec.counter, "cudnn_fwd", index)
            out, lse = cudnn_forward(q, k, v, causal=causal, scale=spec.scale, implementation=implementation)
            return out.astype(jnp.float32), lse

        return run

    def on_fallback():
        instrument.record(spec.counter, "cudnn_fallback_fwd", index)
        return fallback.forward(spec, q, k, v, qp, kp, qs, ks, None, index)

    # cudnn_forward's causal mode needs t == s; `classify` never picks the diagonal otherwise.
    diagonal = on_cudnn(True) if spec.causal and q.shape[1] == k.shape[1] else on_fallback
    branches = [lambda: _empty(q, k, v, qp, kp, qs, ks), on_cudnn(False), diagonal, on_fallback]
    return lax.switch(classify(qp, kp, qs, ks, spec.causal), branches)


def forward(spec, q, k, v, qp, kp, qs, ks, active=None, index=None):
    """`LocalKernel.forward`: the hop as up to 4 sub-pairs, each on cuDNN where its mask allows."""
    fallback = _fallback()
    if not spec.skip_masked:  # the classic ring computes and masks everything: no classification
        return fallback.forward(spec, q, k, v, qp, kp, qs, ks, active, index)
    implementation = "cudnn" if current_target().platform == "gpu" else "xla"

    def compute():
        kv_halves = list(zip(*(_halves(x, spec.kv_tile) for x in (k, v, kp, ks)), strict=True))
        q_halves = zip(_halves(q, spec.q_tile), _halves(qp, spec.q_tile), _halves(qs, spec.q_tile), strict=True)
        outs, lses = [], []
        for q_h, qp_h, qs_h in q_halves:
            parts = [
                _sub_pair(spec, fallback, implementation, index, q_h, k_h, v_h, qp_h, kp_h, qs_h, ks_h)
                for k_h, v_h, kp_h, ks_h in kv_halves
            ]
            out, lse = parts[0]
            for part in parts[1:]:  # the key halves of this query half, merged by log-sum-exp in fp32
                out, lse = merge_partials(out, lse, *part)
            outs.append(out)
            lses.append(lse)
        return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)

    if active is None:
        return compute()
    return lax.cond(active, compute, lambda: _empty(q, k, v, qp, kp, qs, ks))


def backward(spec, q, k, v, qp, kp, qs, ks, do, lse, delta, active=None, index=None):
    """`LocalKernel.backward`: the fallback kernel's, from the driver's global ``lse`` and ``delta``."""
    return _fallback().backward(spec, q, k, v, qp, kp, qs, ks, do, lse, delta, active, index)
