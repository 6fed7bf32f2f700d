"""Shared pieces of the train-engine tests: one tiny model, deterministic batches, compiled steps.

Compiling a train step is the expensive part of these tests on a 2-core CPU, so every step function
is built once per process and shared between test_step.py and test_checkpoint.py. Meshes:

- ``single``: one device — the reference;
- ``ring``: ``data=2, sequence=4`` with ring attention (the demo's mesh), one batch per step;
- ``fsdp``: ``fsdp=2, tensor=2, sequence=2`` (FSDP + heads over tensor + ring) with 2 micro-batches.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np

import model
from sharding.mesh import MeshConfig, make_mesh
from train.data import make_iterator
from train.data_config import DataConfig
from train.optim import OptimConfig
from train.stage import build_engine

CFG = model.preset("tiny")  # attention_impl "auto": reference on one device, ring when sequence > 1
SEQ, BATCH, LOSS_CHUNK, TOTAL_STEPS = 64, 4, 16, 8
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, schedule="cosine", weight_decay=0.1, clip_norm=1.0)
# Short prose documents (several per row: segment ids, position resets, padding) mixed with passkey
# documents (answer tokens weighted 10x in loss_mask), from the data helper's pipeline.
DATA = DataConfig.from_dict(
    {
        "sources": [
            {"kind": "synthetic", "task": "prose", "min_length": 10, "max_length": 90},
            {"kind": "synthetic", "task": "passkey", "min_length": 260, "max_length": 300},
        ]
    }
)
MESHES = {
    "single": (MeshConfig(data=1, fsdp=1, tensor=1, sequence=1), 1, 1),
    "ring": (MeshConfig(data=2, fsdp=1, tensor=1, sequence=4), 8, 1),
    "fsdp": (MeshConfig(data=1, fsdp=2, tensor=2, sequence=2), 8, 2),
}


def optim_for(name: str) -> OptimConfig:
    return OPTIM.replace(grad_accum_steps=MESHES[name][2])


@functools.cache
def mesh_for(name: str):
    cfg, n, _ = MESHES[name]
    return make_mesh(cfg, jax.devices()[:n])


@functools.cache
def host_params():
    """Initial parameters as numpy, drawn like `model.init_params` (normal 0.02, norm scales 1).

    Drawn on the host from a seed: compiling the Flax init costs more CPU than the tests it feeds.
    """
    rng = np.random.default_rng(0)
    shapes = nn.meta.unbox(model.abstract_params(CFG))

    def draw(path, x):
        if path[-1].key == "scale":
            return np.ones(x.shape, np.float32)
        return (0.02 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def engine_for(name: str):
    """Optimizer, shardings and train step on mesh ``name``, built once (`train.stage.build_engine`)."""
    return build_engine(CFG, optim_for(name), mesh_for(name), total_steps=TOTAL_STEPS, loss_chunk=LOSS_CHUNK)


def fresh_state(name: str):
    """A new state on mesh ``name`` from the shared initial params (fresh buffers: safe to donate)."""
    return engine_for(name).init(jax.random.key(0), params=host_params())


def step_for(name: str):
    return engine_for(name).train_step


def iterator(num_shards: int, seed: int = 0):
    """The data helper's iterator over synthetic passkey documents, in the zigzag layout for ``num_shards``."""
    layout = "zigzag" if num_shards > 1 else "contiguous"
    return make_iterator(DATA, SEQ, BATCH, seed, layout=layout, num_shards=num_shards)


def num_shards(name: str) -> int:
    return MESHES[name][0].sequence


def rel_err(a, b) -> float:
    """Norm-wise relative error ``‖a − b‖ / ‖b‖`` (the largest over the leaves of two trees)."""
    errs = [
        float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64)) / np.linalg.norm(np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(errs)


@contextlib.contextmanager
def persistent_compile_cache(directory):
    """XLA's persistent compilation cache in ``directory`` for the block: runs (resumes, CLI re-runs, a
    by-hand step after the runner) that compile the same programs load them instead of compiling again."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cc.reset_cache()
    try:
        yield
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
