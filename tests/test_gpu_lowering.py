"""Every kernel `attention.choose_kernel` can pick on a GPU lowers for CUDA on this CPU-only host.

``jax.export`` for ``platforms=["cuda"]`` runs JAX's Pallas→Triton and Pallas→Mosaic GPU lowerings
and emits cuDNN's custom calls without a GPU, so tiling, layout and shared-memory errors show up
here (compiling to PTX still needs a GPU). Each test asserts the kernel's custom call is in the
exported module:

- ``triton`` (compute capability 8.0): `pallas_forward` / `pallas_backward` → ``__gpu$xla.gpu.triton``;
- ``mosaic_gpu`` (9.0): `mosaic_gpu_forward` / `mosaic_gpu_backward` → ``mosaic_gpu_v2``;
- cuDNN: ``jax.nn.dot_product_attention(implementation="cudnn")`` and its VJP →
  ``__cudnn$fmhaSoftmax`` / ``__cudnn$fmhaSoftmaxBackward``; `cudnn_forward` (ring hops, fp32 LSE).
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

import model
from attention import Target, choose_kernel, compile_target
from attention.cudnn_hop import cudnn_forward
from attention.kernels import AttentionError
from attention.pallas_flash import pallas_backward, pallas_forward
from attention.pallas_mgpu import mosaic_gpu_backward, mosaic_gpu_forward

TRITON, MOSAIC_GPU = "__gpu$xla.gpu.triton", "mosaic_gpu_v2"
CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
# Custom calls without export-compatibility guarantees: lowering them is the point, not serializing.
UNCHECKED = [
    export.DisabledSafetyCheck.custom_call(n) for n in (TRITON, "mosaic_gpu", MOSAIC_GPU, CUDNN_FWD, CUDNN_BWD)
]
S = jax.ShapeDtypeStruct


def _custom_calls(fn, *args, cc: float) -> list[str]:
    """Custom-call targets of ``fn`` exported for CUDA, traced for a GPU of compute capability ``cc``."""
    with compile_target("gpu", cc):
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=UNCHECKED)(*args)
    lines = exported.mlir_module().splitlines()
    return [line.split("custom_call @")[1].split("(")[0] for line in lines if "custom_call @" in line]


def _args(t, s, n, kv_heads, h, dtype, backward=False):
    b, i32 = 2, jnp.int32
    args = [S((b, t, n, h), dtype), S((b, s, kv_heads, h), dtype), S((b, s, kv_heads, h), dtype)]
    args += [S((b, t), i32), S((b, s), i32), S((b, t), i32), S((b, s), i32)]
    if backward:  # do, lse, delta
        args += [S((b, t, n, h), jnp.float32), S((b, t, n), jnp.float32), S((b, t, n), jnp.float32)]
    return args


# (n, kv heads, h, t, s): GQA 4:1 and 3:1, head sizes 64 and 128, lengths that are not tile multiples.
SHAPES = [(8, 2, 64, 100, 130), (6, 2, 128, 200, 72)]


def test_choose_kernel_on_gpu_targets():
    assert choose_kernel("pallas", target=Target("gpu", 8.0)) == "triton"
    assert choose_kernel("pallas", target=Target("gpu", 9.0)) == "mosaic_gpu"
    assert choose_kernel("auto", target=Target("gpu", 9.0)) == "mosaic_gpu"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("n", "kv_heads", "h", "t", "s"), SHAPES)
def test_triton_lowers_for_cuda(n, kv_heads, h, t, s, dtype):
    fwd = lambda *a: pallas_forward(*a, causal=True, scale=h**-0.5)  # noqa: E731
    bwd = lambda *a: pallas_backward(*a, causal=True, scale=h**-0.5)  # noqa: E731
    # jax 0.10 (what `make test` installs) lowers Pallas→Triton without a GPU device.
    assert _custom_calls(fwd, *_args(t, s, n, kv_heads, h, dtype), cc=8.0) == [TRITON]
    assert _custom_calls(bwd, *_args(t, s, n, kv_heads, h, dtype, True), cc=8.0) == [TRITON, TRITON]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n", "kv_heads", "h", "t", "s"), SHAPES)
def test_mosaic_gpu_lowers_for_cuda(n, kv_heads, h, t, s, causal):
    fwd = lambda *a: mosaic_gpu_forward(*a, causal=causal, scale=h**-0.5)  # noqa: E731
    bwd = lambda *a: mosaic_gpu_backward(*a, causal=causal, scale=h**-0.5)  # noqa: E731
    assert _custom_calls(fwd, *_args(t, s, n, kv_heads, h, jnp.bfloat16), cc=9.0) == [MOSAIC_GPU]
    assert _custom_calls(bwd, *_args(t, s, n, kv_heads, h, jnp.bfloat16, True), cc=9.0) == [MOSAIC_GPU] * 2


def test_mosaic_gpu_tiles_stream_long_rows():
    """A 16K-key row at h=128 fits: K/V stream in 64-row tiles, not as one shared-memory block."""
    args = _args(128, 16384, 8, 2, 128, jnp.bfloat16)
    assert _custom_calls(lambda *a: mosaic_gpu_forward(*a, causal=True, scale=0.1), *args, cc=9.0) == [MOSAIC_GPU]


def test_mosaic_gpu_rejects_fp32_and_odd_heads():
    with pytest.raises(AttentionError, match="bf16 or f16"):
        _custom_calls(
            lambda *a: mosaic_gpu_forward(*a, causal=True, scale=0.1), *_args(64, 64, 4, 1, 64, jnp.float32), cc=9.0
        )
    with pytest.raises(AttentionError, match="multiple of 64"):
        _custom_calls(
            lambda *a: mosaic_gpu_forward(*a, causal=True, scale=0.1), *_args(64, 64, 4, 1, 96, jnp.bfloat16), cc=9.0
        )


@pytest.fixture
def cudnn_version(monkeypatch):
    """JAX's cuDNN lowering asks the installed cuDNN for its version; a CPU-only jaxlib has none.

    The version only selects cuDNN features (none used here: no bias, dropout, fp8 or MLA), so
    without a CUDA plugin the test states one (9.8); with one installed, the real version is used.
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    from jax._src.lib import cuda_versions

    if cuda_versions is None:
        monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 90800)


@pytest.mark.parametrize("kv_heads", [8, 2])  # MHA and native GQA 4:1
def test_cudnn_lowers_for_cuda(cudnn_version, kv_heads):
    q, kv = S((2, 256, 8, 128), jnp.bfloat16), S((2, 256, kv_heads, 128), jnp.bfloat16)

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.1, implementation="cudnn")

    def grads(q, k, v):
        out, vjp = jax.vjp(attend, q, k, v)
        return vjp(jnp.ones_like(out))

    assert _custom_calls(attend, q, kv, kv, cc=9.0) == [CUDNN_FWD]
    assert _custom_calls(grads, q, kv, kv, cc=9.0) == [CUDNN_FWD, CUDNN_BWD]


@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_hop_lowers_with_fp32_lse(cudnn_version, causal):
    q, kv = S((2, 256, 8, 64), jnp.bfloat16), S((2, 256, 2, 64), jnp.bfloat16)
    hop = lambda q, k, v: cudnn_forward(q, k, v, causal=causal, scale=0.125)  # noqa: E731
    assert _custom_calls(hop, q, kv, kv, cc=9.0) == [CUDNN_FWD]
    with compile_target("gpu", 9.0):
        exported = export.export(jax.jit(hop), platforms=["cuda"], disabled_checks=UNCHECKED)(q, kv, kv)
    out, lse = exported.out_avals
    assert (out.shape, out.dtype) == ((2, 256, 8, 64), jnp.bfloat16)
    assert (lse.shape, lse.dtype) == ((2, 256, 8), jnp.float32)  # not the public API's bf16 residual


def test_the_model_reaches_cudnn_for_default_positions(cudnn_version):
    """Token ids alone (default positions, one document): the model's attention is cuDNN's flash
    kernel on an H100, forward and backward. With packed documents (segment ids) cuDNN cannot take
    the mask, and the fused local kernel (Mosaic GPU, bf16) runs instead."""
    cfg = model.preset("tiny", head_dim=64, num_heads=4, num_kv_heads=2, hidden_size=256, dtype="bfloat16",
                       attention_chunk=64)  # fmt: skip
    llama = model.Llama(cfg)
    params = jax.eval_shape(lambda: llama.init(jax.random.key(0), jnp.zeros((1, 128), jnp.int32))["params"])
    tokens = S((2, 128), jnp.int32)

    def loss(p, tokens, segments=None):
        return jnp.sum(llama.apply({"params": p}, tokens, segment_ids=segments).astype(jnp.float32))

    plain = _custom_calls(jax.grad(loss), params, tokens, cc=9.0)
    assert CUDNN_FWD in plain and CUDNN_BWD in plain and MOSAIC_GPU not in plain
    packed = _custom_calls(jax.grad(loss), params, tokens, tokens, cc=9.0)
    assert CUDNN_FWD not in packed and packed.count(MOSAIC_GPU) >= 3  # forward, dq, dk/dv per layer scan
