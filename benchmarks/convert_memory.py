"""Peak resident memory of ``python -m convert`` on a synthetic multi-shard checkpoint of ≥ 2 GB.

    python -m benchmarks.convert_memory [--layers 22] [--shard-size 500MB] [--workdir /tmp]

1. Writes a Llama-shaped HF checkpoint with random bf16 weights, one tensor at a time (the
   generator itself stays small), sharded at ``--shard-size``.
2. Runs ``hf-to-flax`` and then ``flax-to-hf`` each in its own child process and reads that
   child's peak RSS from ``os.wait4`` (``ru_maxrss``; it counts file pages mapped by safetensors
   too), plus its wall time.
3. Checks the exported tensors are bit-identical to the generated ones, and compares each peak
   with the requirement: peak ≤ 1.25 × model size in the output dtype + 1 GiB.

Everything lives in a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes  # noqa: F401
import numpy as np

from convert import safetensors_io as st
from convert.hf import hf_config_dict
from convert.names import expected_tensors
from model.config import LlamaConfig

GIB = 2**30


def synthetic_config(layers: int) -> LlamaConfig:
    """Llama-3-shaped (GQA 4, head_dim 128, untied), small vocab so the layers dominate."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=layers,
        num_heads=16,
        num_kv_heads=4,
        head_dim=128,
        param_dtype="bfloat16",
    )


def write_synthetic(cfg: LlamaConfig, path: Path, shard_size: str) -> int:
    """A sharded HF checkpoint of random bf16 weights; returns its size in bytes."""
    path.mkdir(parents=True)
    expected = expected_tensors(cfg)
    specs = [st.TensorSpec(n, rule.hf_shape(cfg), "bfloat16") for n, (rule, _) in expected.items()]
    shards = st.plan_shards(specs, st.shard_bytes(shard_size))
    files = st.shard_names(len(shards))
    rng = np.random.default_rng(0)

    def arrays(group):
        for spec in group:
            x = rng.standard_normal(spec.shape, dtype=np.float32)
            x *= 0.02
            yield x.astype("bfloat16")

    for file, group in zip(files, shards, strict=True):
        st.write_safetensors(path / file, group, arrays(group), {"format": "pt"})
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in specs)},
        "weight_map": {s.name: f for f, g in zip(files, shards, strict=True) for s in g},
    }
    (path / st.INDEX_FILE).write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg, "bfloat16")))
    return sum(s.nbytes for s in specs)


def run_measured(argv: list[str]) -> tuple[int, float]:
    """Run ``python -m convert *argv`` in a child; return (peak RSS bytes, wall seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "convert", *argv], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"convert {argv[0]} failed with status {proc.returncode}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def same_tensors(a: Path, b: Path) -> bool:
    """Bit-identical tensors under the same names, compared one at a time."""
    left, right = st.list_tensors(a), st.list_tensors(b)
    if sorted(left) != sorted(right):
        return False
    for info, x in st.read_tensors(left.values()):
        _, y = next(st.read_tensors([right[info.name]]))
        if x.dtype != y.dtype or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="decoder layers (22 gives ~2.25 GB in bf16)")
    parser.add_argument("--shard-size", default="500MB", help="shard size of the synthetic input and the export")
    parser.add_argument("--workdir", default=None, help="where the temporary files go (default: system temp)")
    args = parser.parse_args()

    cfg = synthetic_config(args.layers)
    work = Path(tempfile.mkdtemp(prefix="convert-mem-", dir=args.workdir))
    try:
        src, ckpt, out = work / "hf", work / "ckpt", work / "hf-out"
        t0 = time.perf_counter()
        size = write_synthetic(cfg, src, args.shard_size)
        shards = len(list(src.glob("*.safetensors")))
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB bf16 in {shards} shards ({time.perf_counter() - t0:.0f} s)")
        budget = 1.25 * size + GIB
        rows = []
        for argv in (
            ["hf-to-flax", str(src), str(ckpt)],
            ["flax-to-hf", str(ckpt), str(out), "--max-shard-size", args.shard_size],
        ):
            peak, wall = run_measured(argv)
            rows.append((argv[0], peak, wall))
        identical = same_tensors(src, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel: {cfg.num_params() / 1e9:.3f} B params, {size / GIB:.2f} GiB bf16; budget 1.25 x size + 1 GiB")
    print("| direction | peak RSS (GiB) | peak / model size | budget (GiB) | within | wall (s) |")
    print("|---|---|---|---|---|---|")
    for name, peak, wall in rows:
        ok = "yes" if peak <= budget else "NO"
        print(f"| {name} | {peak / GIB:.2f} | {peak / size:.2f} | {budget / GIB:.2f} | {ok} | {wall:.0f} |")
    print(f"\nround trip bit-identical: {identical}")
    if not identical or any(peak > budget for _, peak, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
