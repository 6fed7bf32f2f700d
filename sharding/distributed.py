"""Multi-host start-up and host-data → global-array helpers.

`initialize_distributed` wraps ``jax.distributed.initialize`` so one script runs unchanged on
a laptop, a SLURM/MPI GPU cluster or a TPU pod: with explicit arguments it connects to that
coordinator; without, it initializes only when a multi-process cluster environment is
present (JAX then auto-detects the coordinator from it) and is a no-op for a single process.
Calling it twice is harmless.

For the data pipeline, each process loads only the rows/positions its own devices hold
(`process_local_index`) and `global_array_from_process_data` assembles the global,
sharded array from those pieces without any host seeing the whole batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Sharding

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """Multi-host start-up that cannot proceed; the message says what to change."""


def _int(text: str | None, default: int = 1) -> int:
    try:
        return int((text or str(default)).split("(")[0])  # SLURM writes counts like "2(x4)"
    except ValueError:
        return default


def detect_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The multi-process cluster environment we are in (``slurm``, ``mpi``, ``tpu``, ``env``), or None.

    Only environments with more than one process count: a single SLURM task or a single-host
    TPU VM needs no distributed runtime.
    """
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS") and _int(env.get("JAX_NUM_PROCESSES")) > 1:
        return "env"
    if env.get("SLURM_JOB_ID") and _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")) > 1:
        return "slurm"
    if _int(env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")) > 1:
        return "mpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> bool:
    """Start JAX's multi-process runtime when there is more than one process; idempotent.

    Args:
        coordinator_address: ``host:port`` of process 0; give it with ``num_processes`` and
            ``process_id`` for a hand-launched cluster. Omit all three to auto-detect SLURM,
            Open MPI or a TPU pod (``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
            ``JAX_PROCESS_ID`` are read too).
        num_processes, process_id: the process count and this process's rank.
        local_device_ids: devices this process drives (default: all visible).

    Returns:
        True when the distributed runtime is running after the call, False for a plain
        single-process run.
    """
    if jax.distributed.is_initialized():
        return True
    if coordinator_address is None and (num_processes is not None or process_id is not None):
        raise DistributedError("num_processes/process_id need coordinator_address (host:port of process 0) too.")
    if coordinator_address is None:
        cluster = detect_cluster()
        if cluster is None:
            return False  # one process, no cluster: nothing to start
        if cluster == "env":
            if "JAX_PROCESS_ID" not in os.environ:
                raise DistributedError("JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not: set this rank's id.")
            coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
            num_processes = _int(os.environ.get("JAX_NUM_PROCESSES"))
            process_id = _int(os.environ.get("JAX_PROCESS_ID"), -1)
        log.info("initializing jax.distributed for a %s cluster", cluster)
    elif num_processes is None or process_id is None:
        if detect_cluster() is None:
            raise DistributedError(
                "with coordinator_address outside a SLURM/MPI/TPU cluster, give num_processes and process_id too."
            )
    elif not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id {process_id} is outside 0..{num_processes - 1}: fix the rank.")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    except RuntimeError as exc:
        if "should only be called once" in str(exc) or "already" in str(exc):
            return True
        raise DistributedError(f"jax.distributed.initialize failed ({exc}): check the coordinator address.") from exc
    return True


def process_local_index(sharding: Sharding, global_shape: Sequence[int]) -> tuple[slice, ...]:
    """The block of a ``global_shape`` array that this process's devices hold (a slice per dim).

    The data pipeline loads exactly this block (e.g. rows ``[r0, r1)`` of the global batch
    and, with sequence sharding across hosts, positions ``[p0, p1)``) and hands it to
    `global_array_from_process_data`.
    """
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    out = []
    for dim, size in enumerate(global_shape):
        starts, stops = [], []
        for idx in index_map.values():
            s = idx[dim] if dim < len(idx) else slice(None)
            start, stop, _ = s.indices(size)
            starts.append(start)
            stops.append(stop)
        out.append(slice(min(starts), max(stops)))
    return tuple(out)


def global_array_from_process_data(
    local_data: np.ndarray, sharding: Sharding, global_shape: Sequence[int] | None = None
) -> jax.Array:
    """A globally-sharded `jax.Array` from this process's block (`process_local_index`).

    With one process the block is the whole array. ``global_shape`` defaults to the local
    shape scaled by the process count along the sharded dims (JAX's rule).
    """
    return jax.make_array_from_process_local_data(
        sharding, np.asarray(local_data), None if global_shape is None else tuple(global_shape)
    )
