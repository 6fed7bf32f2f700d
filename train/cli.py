"""``python -m train`` / ``ringllama-train``: run a curriculum from a YAML config.

    python -m train --config configs/demo.yaml --run-dir runs/demo
    python -m train --config configs/demo.yaml --set stages.1.steps=10 --set optim.lr=1e-3
    python -m train --config configs/demo.yaml --run-dir runs/demo --resume
    python -m train --config configs/llama3-8b-1m.yaml --init-from Meta-Llama-3-8B-hf \\
        --coordinator 10.0.0.1:1234 --num-processes 64 --process-id $RANK
    python -m train compile --config configs/llama3-8b-1m.yaml --topology v5p-128   # see train.compile

Exit status: 0 done (or stopped by --stop-after), 2 bad input (config, data, checkpoint, a run
that will not fit — reported before anything compiles), 1 training failure (non-finite loss).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from attention.layout import LayoutError
from convert.names import ConversionError
from model.config import ConfigError
from sharding.distributed import DistributedError, initialize_distributed
from sharding.mesh import MeshError
from text.tokenizer import TokenizerError
from train import compile as compile_cmd
from train.checkpoint import CheckpointError
from train.config import config_help, load_config
from train.curriculum import run
from train.data_config import DataError
from train.guards import NonFiniteError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Curriculum context-extension training for ringllama (JAX/Flax Llama 3).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config fields (YAML keys; override any with --set key.sub=value, list items by index):\n\n"
        + config_help(),
    )
    parser.add_argument("--config", help="YAML run config (see configs/); default: all defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=1e-3 --set stages.1.steps=10 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--run-dir", help="run directory (overrides run_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    parser.add_argument("--init-from", metavar="PATH", help="start from a ringllama checkpoint or a Hugging Face dir")
    parser.add_argument(
        "--stop-after", type=int, metavar="N", help="stop after N global steps with a checkpoint (then --resume)"
    )
    parser.add_argument("--allow-oversize", action="store_true", help="start even if the memory planner says no")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--cpu-devices", type=int, metavar="N", help="emulate N CPU devices (sets XLA_FLAGS before JAX starts)"
    )
    dist = parser.add_argument_group("multi-host (or set JAX_COORDINATOR_ADDRESS / SLURM / MPI / TPU env)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    dist.add_argument("--num-processes", type=int, help="number of processes")
    dist.add_argument("--process-id", type=int, help="this process's rank")
    return parser


def _emulate_cpu_devices(n: int) -> None:
    # Importing jax starts no backend; the flag is read when the first one starts (after this).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile"]:
        return compile_cmd.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.cpu_devices:
        _emulate_cpu_devices(args.cpu_devices)
    bad_input = (
        ConfigError, DataError, MeshError, LayoutError, TokenizerError, ConversionError, CheckpointError,
        DistributedError,
    )  # fmt: skip
    try:
        # Multi-host start-up comes before anything asks JAX for devices.
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        overrides = list(args.overrides)
        if args.no_progress:
            overrides.append("progress=false")
        if args.allow_oversize:
            overrides.append("allow_oversize=true")
        cfg = load_config(args.config, overrides)
        result = run(
            cfg, run_dir=args.run_dir, resume=args.resume, init_from=args.init_from, stop_after=args.stop_after
        )
    except bad_input as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as exc:
        print(f"error: training stopped: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted; the newest checkpoint is intact: continue with --resume.", file=sys.stderr)
        return 130
    return 0 if result is not None else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
