"""Deviceless TPU devices for compile tests: libtpu's real XLA TPU and Mosaic compilers on a CPU host.

``get_topology_desc`` describes TPU chips that need not exist; programs lowered and compiled for
its devices go through the same compilers as on a TPU VM (Mosaic errors surface at ``compile()``),
but nothing runs. libtpu comes with ``jax[tpu]`` (the version matching jax; ``make test`` installs
it). A missing libtpu fails the test, never skips it: a skip would hide that no TPU compile ran.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import pytest

# Read when libtpu initialises: without the first it queries the GCE metadata server; without
# the second a libtpu already loaded by another process on this host (holding /tmp/libtpu_lockfile)
# makes the load fail, though a deviceless compile claims no chip.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# (topology_name, chip_config_name, chips_per_host_bounds): four chips of each kind.
TOPOLOGIES = {
    "v5p": ("v5p:2x2x1", "megacore", (2, 2, 1)),
    "v6e": ("v6e:2x2", "default", (2, 2, 1)),
}


def tpu_devices(chip: str) -> list:
    """The devices of a four-chip ``chip`` (a key of `TOPOLOGIES`) topology, for deviceless compiles."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail(
            f"libtpu is not installed, so nothing can compile for TPU: `make test` installs it "
            f'(pip install "jax[tpu]=={jax.__version__}"), or put an existing libtpu on PYTHONPATH.',
            pytrace=False,
        )
    from jax.experimental.topologies import get_topology_desc

    name, config, bounds = TOPOLOGIES[chip]
    topology = get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=config, chips_per_host_bounds=bounds, num_slices=1
    )
    return list(topology.devices)


@pytest.fixture(scope="session", params=sorted(TOPOLOGIES))
def tpu_device(request):
    """One device of each TPU kind in `TOPOLOGIES` (the test runs once per kind)."""
    return tpu_devices(request.param)[0]
