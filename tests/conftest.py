"""Test setup: an emulated 8-device CPU mesh, the CPU backend only (libtpu is installed) and fp32-exact matmuls.

``XLA_FLAGS`` must be set before jax is first imported, so it happens here at import time.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu is installed for the deviceless TPU compiles (tests/test_sharding_compile.py): it must never
# look for a TPU or the GCE metadata server on a CPU host.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Tolerances in the tests are fp32 ones; XLA's CPU default may use lower-precision dots.
jax.config.update("jax_default_matmul_precision", "highest")

try:  # torch's intra-op threads fight XLA for the CI box's two cores on tiny reference models
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is only in the test extra
    pass


def pytest_report_header(config):
    return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"
