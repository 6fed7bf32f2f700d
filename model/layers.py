"""The model's math as small pure functions: RMSNorm, SwiGLU MLP, QKV projection, output.

Shape letters: the legend in `attention` (b t d n k h f here).
Modules in `model.llama` own the parameters and call these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x_btd: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32 (as HF does), scaled, returned in x's dtype."""
    x32 = x_btd.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale_d.astype(jnp.float32) * normed).astype(x_btd.dtype)


def swiglu_mlp(x_btd: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
    """``down(silu(gate(x)) * up(x))``."""
    gate_btf = jnp.einsum("btd,df->btf", x_btd, gate_df)  # [b, t, f]
    up_btf = jnp.einsum("btd,df->btf", x_btd, up_df)  # [b, t, f]
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, down_fd)  # [b, t, d]


def project_qkv(
    x_btd: jax.Array, wq_dnh: jax.Array, wk_dkh: jax.Array, wv_dkh: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries ``[b, t, n, h]`` and keys/values ``[b, t, k, h]`` (only the kv heads, never repeated)."""
    q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, wq_dnh)  # [b, t, n, h]
    k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wk_dkh)  # [b, t, k, h]
    v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, wv_dkh)  # [b, t, k, h]
    return q_btnh, k_btkh, v_btkh


def project_out(o_btnh: jax.Array, wo_nhd: jax.Array) -> jax.Array:
    """Attention output projection back to ``[b, t, d]``."""
    return jnp.einsum("btnh,nhd->btd", o_btnh, wo_nhd)  # [b, t, d]
