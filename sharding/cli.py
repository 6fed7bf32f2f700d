"""``python -m sharding plan``: will a training run fit? Per-device memory from `sharding.planner`.

    python -m sharding plan --preset llama3-8b --seq-len 1048576 --mesh data=1,fsdp=8,sequence=64 \\
        --device-memory 80GiB --remat full --batch 1

Prints the plan table and whether it fits; with a ``sequence`` axis > 1 also each ring hop's
compute time against its K/V transfer time (`sharding.comm`: ``--device-type``/``--kernel-tflops``,
``--link``/``--link-gbps``). Exits 0 either way, 2 on bad flags.

``python -m sharding compile --config RUN.yaml --topology v5p-128`` compiles a run's real train step
for a TPU slice (or lowers it for a GPU node) and sets XLA's per-device bytes beside this planner's.
Building that step needs the run-config loader and the train step, which live in ``train``, a layer
above this package; so the command runs ``python -m train compile`` (`train.compile`) as a child
process with the same arguments, and the import graph stays one-way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import subprocess
import sys

import model
from model.config import ConfigError
from model.lora import LoraConfig
from sharding.comm import KERNEL_TFLOPS, LINK_GBYTES, CommError, model_overlap_plan, resolve_rates
from sharding.cp_plan import LINKS, model_strategies, recommend, strategy_table
from sharding.mesh import AXES, MeshConfig, MeshError
from sharding.planner import REMATS, PlanError, plan_memory
from sharding.sizes import SizeError, has_unit, parse_size


class UsageError(ValueError):
    """A bad command-line value; the message names it and says what to write instead."""


def parse_bytes(text: str) -> int:
    """``--device-memory``: a size (`sharding.sizes.parse_size`); a bare number must be at least 1 MiB."""
    try:
        value = parse_size(text, "--device-memory")
    except SizeError as exc:
        raise UsageError(str(exc)) from exc
    if not has_unit(text) and value < 2**20:
        raise UsageError(f"--device-memory {text!r} has no unit and is under 1 MiB: write e.g. {text}GB or {text}GiB.")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sharding", description="ringllama sharding tools")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "compile",
        add_help=False,
        help="compile a run's train step for a TPU slice / lower it for a GPU (python -m train compile --help)",
    )
    plan = sub.add_parser("plan", help="per-device memory of one training step")
    plan.add_argument("--preset", default="llama3-8b", help="model preset (model.PRESETS), default llama3-8b")
    plan.add_argument("--config", help="a Hugging Face config.json (or model dir) instead of --preset")
    plan.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    plan.add_argument("--batch", type=int, default=1, help="sequences per step (global), default 1")
    plan.add_argument("--mesh", required=True, help="mesh sizes, e.g. data=1,fsdp=8,sequence=64")
    plan.add_argument("--devices", type=int, help="device count, needed when an axis is -1")
    plan.add_argument("--remat", default="full", choices=REMATS, help="remat policy, default full")
    plan.add_argument("--attention", choices=("auto", "reference", "xla", "blockwise", "ring"), default="auto")
    plan.add_argument("--attention-chunk", type=int, help="chunk of blockwise/ring attention (default: config's)")
    plan.add_argument("--loss-chunk", type=int, default=1024, help="positions per loss chunk (0: full logits)")
    plan.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"), help="compute")
    plan.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    plan.add_argument("--device-memory", help="memory per device, e.g. 80GB / 80GiB / 96e9 bytes")
    plan.add_argument("--lora-rank", type=int, help="plan LoRA training with this rank (default: full fine-tune)")
    plan.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (no memory effect), default 16")
    plan.add_argument(
        "--lora-targets", default="q,k,v,o", help="adapted kernels, from q,k,v,o,gate,up,down (default q,k,v,o)"
    )
    plan.add_argument(
        "--lora-trained",
        default="embeddings,norms",
        help="non-adapter leaves that train beside the adapters, from embeddings,norms or 'none' (default "
        "embeddings,norms: LongLoRA's recipe)",
    )
    plan.add_argument("--lora-base-dtype", choices=("float32", "bfloat16", "float16"), help="frozen base dtype")
    plan.add_argument(
        "--device-type", default="h100", help=f"kernel TFLOP/s table entry ({', '.join(KERNEL_TFLOPS)}), default h100"
    )
    plan.add_argument("--kernel-tflops", type=float, help="measured attention kernel TFLOP/s (overrides --device-type)")
    plan.add_argument(
        "--link", default="nvlink4", help=f"sequence-axis link ({', '.join(LINK_GBYTES)}), default nvlink4"
    )
    plan.add_argument("--link-gbps", type=float, help="one-way sequence-axis link GB/s (overrides --link)")
    plan.add_argument("--ulysses-size", type=int, help="hybrid's Ulysses group (default: up to 8 that divides)")
    return p


def _lora_config(args):
    if args.lora_rank is None:
        return None
    trained = {x.strip() for x in args.lora_trained.split(",") if x.strip() and x.strip() != "none"}
    if unknown := trained - {"embeddings", "norms"}:
        raise UsageError(
            f"--lora-trained takes embeddings, norms or none, not {', '.join(sorted(unknown))}: fix the list."
        )
    return LoraConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        train_embeddings="embeddings" in trained,
        train_norms="norms" in trained,
        base_dtype=args.lora_base_dtype,
    )


def _load_config(args):
    if args.config:
        cfg = model.LlamaConfig.from_hf(args.config)
    else:
        cfg = model.preset(args.preset)
    changes = {"dtype": args.dtype, "param_dtype": args.param_dtype}
    if args.attention_chunk is not None:
        if args.attention_chunk < 1:
            raise UsageError(f"--attention-chunk must be positive, got {args.attention_chunk}.")
        changes["attention_chunk"] = args.attention_chunk
    return cfg.replace(**changes)


def run_plan(args) -> int:
    try:
        device_bytes = None if args.device_memory is None else parse_bytes(args.device_memory)
        mesh = MeshConfig.parse(args.mesh)
        cfg = _load_config(args)
        if args.loss_chunk < 0:
            raise UsageError(f"--loss-chunk must be 0 (full logits) or positive, got {args.loss_chunk}.")
        lora = _lora_config(args)
        plan = plan_memory(
            cfg,
            model.abstract_params(cfg, lora),
            args.seq_len,
            args.batch,
            mesh,
            args.remat,
            attention=args.attention,
            loss_chunk=args.loss_chunk or None,
            num_devices=args.devices,
            lora=lora,
        )
        known = [getattr(mesh, a) for a in AXES]
        sizes = dict(zip(AXES, mesh.resolve(args.devices or math.prod(s for s in known if s > 0)), strict=True))
        tflops, gbytes = resolve_rates(args.device_type, args.kernel_tflops, args.link, args.link_gbps)
        overlap = model_overlap_plan(cfg, args.seq_len, args.batch, sizes, tflops, gbytes)
        strategies = _strategies(args, cfg, sizes, plan, device_bytes)
    except (UsageError, MeshError, PlanError, ConfigError, CommError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    name = args.config or args.preset
    print(f"{name}: {cfg.num_params() / 1e9:.2f}B parameters")
    print(plan.table(device_bytes))
    if device_bytes is not None:
        print("FITS" if plan.fits(device_bytes) else "DOES NOT FIT")
    if overlap is not None:
        if args.kernel_tflops is None:
            print(f"(kernel TFLOP/s for {args.device_type} is an assumed table value: pass a measured --kernel-tflops)")
        print(overlap.table())
    if strategies:
        print(strategies)
    return 0


def _strategies(args, cfg, sizes: dict[str, int], plan, device_bytes: int | None) -> str:
    """Each context-parallel strategy's costs and the recommendation (`sharding.cp_plan`), or ''."""
    if sizes.get("sequence", 1) <= 1:
        return ""
    if args.ulysses_size is not None and args.ulysses_size < 1:
        raise UsageError(f"--ulysses-size must be positive, got {args.ulysses_size}.")
    key = args.device_type if args.device_type in LINKS else "h100"
    links = LINKS[key]
    if args.kernel_tflops is not None:
        links = dataclasses.replace(links, kernel_tflops=args.kernel_tflops)
    if args.link_gbps is not None:
        links = dataclasses.replace(links, fast_gbytes=args.link_gbps)
    cfg = cfg.replace(ulysses_size=args.ulysses_size or 0)
    plans = model_strategies(cfg, args.seq_len, args.batch, sizes, links, remat=args.remat != "none")
    headroom = None
    if device_bytes is not None:  # the plan above already holds the ring's buffers
        ring = next(p for p in plans if p.strategy == "ring")
        headroom = device_bytes - plan.total + ring.extra_bytes
    return strategy_table(plans, recommend(plans, headroom))


def run_compile(argv: list[str]) -> int:
    """``compile``: hand the arguments to ``python -m train compile`` (see the module docstring)."""
    return subprocess.call([sys.executable, "-m", "train", "compile", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compile"]:
        return run_compile(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "plan":
        return run_plan(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    raise SystemExit(main())
