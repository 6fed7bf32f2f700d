"""``python -m convert`` / ``ringllama-convert``: move Llama 3 weights between formats.

    ringllama-convert hf-to-flax   HF_DIR   CKPT_DIR [--dtype bfloat16]
    ringllama-convert flax-to-hf   CKPT_DIR HF_DIR   [--max-shard-size 5GB] [--dtype bfloat16] [--merge-lora]
    ringllama-convert flax-to-peft LORA_CKPT PEFT_DIR [--base-model NAME_OR_PATH]
    ringllama-convert meta-to-flax META_DIR CKPT_DIR [--dtype bfloat16]

Bad input gets one sentence on stderr and exit status 2; the destination is written through a
temporary sibling directory, so a failed run never leaves a partial one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from convert.atomic import check_destination
from convert.checkpoint import load_checkpoint, save_checkpoint
from convert.hf import load_hf, save_hf
from convert.meta import load_meta
from convert.names import ConversionError
from convert.peft import is_lora_checkpoint, load_lora_checkpoint, merge_numpy, save_peft
from model.config import DTYPES, ConfigError

PROG = "ringllama-convert"


def hf_to_flax(src: str, dst: str, dtype: str | None = None, scan_layers: bool = True) -> None:
    """Hugging Face directory → ringllama checkpoint (tokenizer files copied along)."""
    check_destination(dst)  # fail before reading gigabytes
    cfg, params = load_hf(src, dtype, scan_layers=scan_layers)
    save_checkpoint(dst, cfg, params, side_files_from=src)


def flax_to_hf(
    src: str, dst: str, max_shard_size: str = "5GB", dtype: str | None = None, merge_lora: bool = False
) -> None:
    """ringllama checkpoint → Hugging Face directory (a LoRA checkpoint needs ``merge_lora``: W + (α/r)·A·B)."""
    check_destination(dst)
    if is_lora_checkpoint(src) != merge_lora:
        raise ConversionError(
            f"{src} holds LoRA adapters: pass --merge-lora for a merged model, or use flax-to-peft for an adapter "
            "directory."
            if merge_lora is False
            else f"--merge-lora needs a LoRA checkpoint but {src} has no adapters: drop --merge-lora."
        )
    if merge_lora:
        cfg, lora, params, _ = load_lora_checkpoint(src)
        params = merge_numpy(params, lora, "float32")  # W + ΔW in fp32 even on a bf16 base; --dtype casts after
    else:
        cfg, params = load_checkpoint(src)
    save_hf(cfg, params, dst, max_shard_size=max_shard_size, dtype=dtype, side_files_from=src)


def flax_to_peft(src: str, dst: str, base_model: str | None = None) -> None:
    """ringllama LoRA checkpoint → PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    check_destination(dst)
    cfg, lora, params, stored_base = load_lora_checkpoint(src)
    save_peft(dst, cfg, lora, params, base_model or stored_base)


def meta_to_flax(
    src: str,
    dst: str,
    dtype: str | None = None,
    scan_layers: bool = True,
    max_position_embeddings: int | None = None,
    rope_scaling_factor: float | None = None,
) -> None:
    """Meta ``consolidated.*.pth`` directory → ringllama checkpoint."""
    check_destination(dst)
    cfg, params = load_meta(
        src,
        dtype,
        scan_layers=scan_layers,
        max_position_embeddings=max_position_embeddings,
        rope_scaling_factor=rope_scaling_factor,
    )
    save_checkpoint(dst, cfg, params, side_files_from=src)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert Llama 3 weights between Hugging Face, Meta and ringllama (orbax) formats. "
        "Tensors stream one at a time; the destination must not exist and appears only when complete.",
        epilog="examples:\n"
        "  ringllama-convert hf-to-flax Llama-3.2-1B ckpt/llama-1b --dtype bfloat16\n"
        "  ringllama-convert flax-to-hf runs/demo/final out/hf --max-shard-size 2GB\n"
        "  ringllama-convert flax-to-hf runs/lora/lora out/merged --merge-lora\n"
        "  ringllama-convert flax-to-peft runs/lora/lora out/adapter --base-model meta-llama/Meta-Llama-3-8B\n"
        "  ringllama-convert meta-to-flax Meta-Llama-3.1-8B ckpt/llama-8b\n\n"
        "exit status: 0 on success; 2 on bad input, with one sentence on stderr and no destination left behind.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dtype_help = f"parameter dtype of the output ({', '.join(DTYPES)}); default: as stored in the source"

    p = sub.add_parser(
        "hf-to-flax",
        help="Hugging Face LlamaForCausalLM directory -> ringllama checkpoint",
        description="Read config.json and model.safetensors (or model.safetensors.index.json and its shards) "
        "and write a ringllama checkpoint: ringllama_config.json plus an orbax params/ directory.",
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face model directory")
    p.add_argument("dst", metavar="DST", help="new ringllama checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    p.add_argument(
        "--no-scan-layers", dest="scan_layers", action="store_false", help="store layers as layers_i, not stacked"
    )

    p = sub.add_parser(
        "flax-to-hf",
        help="ringllama checkpoint -> Hugging Face directory",
        description="Write config.json (transformers v4 and v5 rope fields), generation_config.json and "
        "safetensors weights loadable by transformers.LlamaForCausalLM.from_pretrained.",
    )
    p.add_argument("src", metavar="SRC", help="ringllama checkpoint directory")
    p.add_argument("dst", metavar="DST", help="new Hugging Face model directory (must not exist)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors file, e.g. 5GB (10^9 bytes), 2GiB or 500MB; larger models are sharded "
        "with a model.safetensors.index.json (default: 5GB)",
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="SRC is a LoRA checkpoint (a run with lora:): write the merged model W + (alpha/r)·B·A",
    )

    p = sub.add_parser(
        "flax-to-peft",
        help="ringllama LoRA checkpoint -> PEFT adapter directory",
        description="Write adapter_config.json and adapter_model.safetensors that "
        "peft.PeftModel.from_pretrained(base_model, DIR) loads onto the base transformers model "
        "(trained embeddings / norms as modules_to_save).",
    )
    p.add_argument("src", metavar="SRC", help="ringllama LoRA checkpoint directory (has lora_config.json)")
    p.add_argument("dst", metavar="DST", help="new PEFT adapter directory (must not exist)")
    p.add_argument(
        "--base-model", default=None, help="base_model_name_or_path to record (default: the one the run recorded)"
    )

    p = sub.add_parser(
        "meta-to-flax",
        help="Meta consolidated.*.pth + params.json -> ringllama checkpoint",
        description="Import Meta's original checkpoint (one or more model-parallel consolidated.NN.pth files), "
        "reordering q/k rows from Meta's interleaved RoPE layout to the half-split one.",
    )
    p.add_argument("src", metavar="SRC", help="Meta checkpoint directory (params.json, consolidated.*.pth)")
    p.add_argument("dst", metavar="DST", help="new ringllama checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    p.add_argument(
        "--no-scan-layers", dest="scan_layers", action="store_false", help="store layers as layers_i, not stacked"
    )
    p.add_argument(
        "--max-position-embeddings",
        type=int,
        default=None,
        help="context length to record (params.json lacks it; default 131072 with use_scaled_rope, else 8192)",
    )
    p.add_argument(
        "--rope-scaling-factor",
        type=float,
        default=None,
        help="llama3 rope factor when params.json sets use_scaled_rope without one (8 for Llama 3.1, 32 for 3.2)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 for bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-flax":
            hf_to_flax(args.src, args.dst, args.dtype, args.scan_layers)
        elif args.command == "flax-to-hf":
            flax_to_hf(args.src, args.dst, args.max_shard_size, args.dtype, args.merge_lora)
        elif args.command == "flax-to-peft":
            flax_to_peft(args.src, args.dst, args.base_model)
        else:
            meta_to_flax(
                args.src, args.dst, args.dtype, args.scan_layers, args.max_position_embeddings, args.rope_scaling_factor
            )
    except (ConversionError, ConfigError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable source, full disk, permissions
        print(f"{PROG}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    print(f"wrote {args.dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
