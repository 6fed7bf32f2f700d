"""Regenerate the demo's short-context base, ``configs/demo-base/`` (a Hugging Face checkpoint).

    python -m benchmarks.demo_base                      # train configs/demo-base.yaml, check, write
    python -m benchmarks.demo_base --from-run runs/demo-base   # package a finished run of that config

`make demo` extends this base the way a user extends Llama-3-8B (``--init-from configs/demo-base``),
so the demo no longer pretrains retrieval from scratch inside the extension run, where a loss
plateau of seed- and CPU-dependent length decided its verdict. This command trains
``configs/demo-base.yaml`` (via ``python -m train``, on the emulated 8-device CPU mesh), checks
that the result is a base worth extending (passkey ≥ `MIN_AT_TRAIN` at its training length and
< `MAX_AT_TARGET` at 4× it, teacher-forced), and writes the HF directory (``config.json``,
``model.safetensors``) with ``provenance.json``: the recipe's path and sha256, the command, seed,
commit, library versions, each file's sha256 and size, and the evals. `tests/test_demo_base.py`
checks the shipped files against that record.

Exit status: 0 written, 1 the trained model failed the check (nothing written; try another
``--seed``), 2 bad input.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata

RECIPE = "configs/demo-base.yaml"
OUT = "configs/demo-base"
PROVENANCE = "provenance.json"
SHIPPED = ("config.json", "model.safetensors")
MIN_AT_TRAIN = 0.95
MAX_AT_TARGET = 0.5


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_verdict(report: dict) -> tuple[bool, dict, str]:
    """``(ok, evals, reason)`` for the last stage of a demo-base run's ``report.json``."""
    name, stage = list(report["stages"].items())[-1]
    acc = stage.get("passkey", {}).get("accuracy", {})
    train_len = stage["seq_len"]
    at_train, at_target = acc.get(str(train_len)), acc.get(str(4 * train_len))
    evals = {"stage": name, "seq_len": train_len, "theta": stage["theta"], "passkey_accuracy": acc,
             "passkey_samples": report["config"]["eval"]["passkey_samples"],
             "perplexity": stage.get("perplexity", {})}  # fmt: skip
    if at_train is None or at_target is None:
        return False, evals, f"the run scored no passkey at {train_len} and {4 * train_len}: keep them in eval."
    if at_train < MIN_AT_TRAIN:
        return False, evals, (f"passkey at {train_len} is {at_train:.0%} (< {MIN_AT_TRAIN:.0%}): the model did "
                              "not leave the loss plateau; train longer or try another --seed.")  # fmt: skip
    if at_target >= MAX_AT_TARGET:
        return False, evals, (f"passkey at {4 * train_len} is already {at_target:.0%} (≥ {MAX_AT_TARGET:.0%}): "
                              "there is nothing left for the extension to show.")  # fmt: skip
    return True, evals, "ok"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def write_base(run_dir: str, out_dir: str, command: list[str], seed: int) -> dict:
    """Copy the run's HF export into ``out_dir`` with its provenance, replacing the old one only when complete."""
    with open(os.path.join(run_dir, "report.json")) as fh:
        report = json.load(fh)
    ok, evals, reason = base_verdict(report)
    if not ok:
        raise SystemExit(f"error: the base in {run_dir} fails its check: {reason}")
    staged = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    files = {}
    for name in SHIPPED:
        shutil.copyfile(os.path.join(run_dir, "hf", name), os.path.join(staged, name))
        path = os.path.join(staged, name)
        files[name] = {"sha256": sha256(path), "bytes": os.path.getsize(path)}
    provenance = {
        "what": "the short-context base that `make demo` extends (--init-from configs/demo-base)",
        "recipe": RECIPE,
        "recipe_sha256": sha256(RECIPE),
        "command": " ".join(["python", *command[1:]]),
        "regenerate": "python -m benchmarks.demo_base",
        "seed": seed,
        "git_commit_when_written": _git_commit(),
        "versions": {p: metadata.version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy")},
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "files": files,
        "evals": evals,
        "run_wall_seconds": report.get("wall_seconds"),  # training + evals + export, on whatever box ran it
    }
    with open(os.path.join(staged, PROVENANCE), "w") as fh:
        json.dump(provenance, fh, indent=1)
        fh.write("\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staged, out_dir)
    return provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-run", metavar="DIR", help="package this finished run of the recipe (no training)")
    parser.add_argument("--run-dir", default="runs/demo-base", help="where to train (default runs/demo-base)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=OUT, help=f"the HF directory to write (default {OUT})")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "train", "--config", RECIPE, "--run-dir", args.run_dir, "--no-progress",
               "--set", f"seed={args.seed}", "--cpu-devices", "8"]  # fmt: skip
    run_dir = args.from_run or args.run_dir
    if args.from_run:
        if not os.path.isfile(os.path.join(args.from_run, "report.json")):
            print(f"error: {args.from_run} holds no report.json: point --from-run at a finished run.", file=sys.stderr)
            return 2
    else:
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        if subprocess.run(command, env=env).returncode != 0:
            print(f"error: training the base failed (see {args.run_dir}/metrics.jsonl)", file=sys.stderr)
            return 1
    try:
        prov = write_base(run_dir, args.out, command, args.seed)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    acc = ", ".join(f"{n}: {v:.0%}" for n, v in prov["evals"]["passkey_accuracy"].items())
    print(f"wrote {args.out} ({sum(f['bytes'] for f in prov['files'].values()) / 1e6:.1f} MB); passkey {acc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
